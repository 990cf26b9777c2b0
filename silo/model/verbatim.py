"""Exact verbatim matching between generated text and a stored document's text.

Everything here is confirmed with exact substring search (`str.find`) on the document's stored text, so a
reported span is always real. Two facts keep it cheap: if a string occurs in a document, so does every
substring of it (lengths can be found by binary search), and the longest suffix of a growing text that
occurs in a document grows by at most one character per character appended (amortised O(1) searches).
"""

from __future__ import annotations

from dataclasses import dataclass


def longest_suffix_in(text: str, doc: str, upper: int | None = None) -> int:
    """Length of the longest suffix of `text` (at most `upper` characters) that occurs in `doc`."""
    lo, hi = 0, min(len(text), len(doc), len(text) if upper is None else upper)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text[len(text) - mid:] in doc:
            lo = mid
        else:
            hi = mid - 1
    return lo


def longest_prefix_in(text: str, start: int, end: int, doc: str) -> int:
    """Length of the longest prefix of text[start:end] that occurs in `doc`."""
    lo, hi = 0, min(end - start, len(doc))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text[start:start + mid] in doc:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class SuffixMatch:
    """The verbatim overlap of a growing text with one document: `length` is the longest suffix of the text
    so far that occurs in the document, `best` the longest span seen (ending at `best_end` in the text)."""

    doc: str
    length: int = 0
    best: int = 0
    best_end: int = 0

    @classmethod
    def start(cls, doc: str, text: str) -> "SuffixMatch":
        """Start following `doc` when the text is `text` (spans that ended before are not seen)."""
        n = longest_suffix_in(text, doc)
        return cls(doc, n, n, len(text))

    def feed(self, text: str, start: int) -> int:
        """The text grew: characters text[start:] are new. Returns the longest span ending among them."""
        top = 0
        for i in range(start, len(text)):
            self.length = self.step(text, i + 1, self.length)
            top = max(top, self.length)
            if self.length > self.best:
                self.best, self.best_end = self.length, i + 1
        return top

    def step(self, text: str, end: int, length: int) -> int:
        """The longest suffix of text[:end] in the document, given `length` for text[:end - 1]."""
        m = length + 1
        while m > 0 and text[end - m:end] not in self.doc:
            m -= 1
        return m


def matching_spans(text: str, start: int, end: int, doc: str, min_chars: int) -> list[tuple[int, int, int]]:
    """Verbatim spans of text[start:end] found in `doc`, at least `min_chars` long: (start, end, doc_start)
    with text[start:end] == doc[doc_start:doc_start + end - start]. Greedy from left to right, a span
    starting at the start of a word and as long as it can be; the next search starts where it ends."""
    out = []
    i = start
    while i < end:
        if i > start and text[i - 1].isalnum() and text[i].isalnum():  # only at word starts
            i += 1
            continue
        if end - i < min_chars or text[i:i + min_chars] not in doc:  # one search rules most positions out
            i += 1
            continue
        m = longest_prefix_in(text, i, end, doc)
        if m >= min_chars:
            out.append((i, i + m, doc.find(text[i:i + m])))
            i += m
        else:
            i += 1
    return out
