"""Sentence segmentation with character spans.

Attribution works per sentence on both sides: the datastore records which sentence of its document each
entry belongs to, and generated text is split the same way. A plain rule-based splitter keeps this
deterministic and dependency-free: a sentence ends after ., ! or ? (optionally followed by closing
quotes or brackets) before whitespace, or at a blank line. Leading/trailing whitespace is not part of a
span.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(r"(?<=[.!?])[\"'\)\]]*\s+|\n\s*\n")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text`, in order, covering all non-space text."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for m in _BOUNDARY.finditer(text):
        _append(text, pos, m.start() + len(m.group(0).rstrip()) if m.group(0).strip() else m.start(), spans)
        pos = m.end()
    _append(text, pos, len(text), spans)
    return spans


def _append(text: str, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if end > start:
        spans.append((start, end))


def sentence_of_offsets(spans: list[tuple[int, int]], offsets: list[int]) -> list[int]:
    """Index of the sentence each character offset falls in (an offset between sentences goes to the next).

    Offsets must be non-decreasing; runs in O(len(spans) + len(offsets)).
    """
    out: list[int] = []
    j = 0
    last = max(len(spans) - 1, 0)
    for off in offsets:
        while j < last and off >= spans[j][1]:
            j += 1
        out.append(j)
    return out
