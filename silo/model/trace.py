"""Tracing an output to the training data: the longest spans of a completion that occur verbatim in the
model's training stream (the training-data index, silo.training.index), with the documents they occur in,
their licences and offsets (OLMoTrace's method on SILO's scale).

For each generated token j, the longest run of tokens ending at j that occurs in the training stream is
found by binary search on the suffix array (it grows by at most one token per token, so the search is
short); a run that the next token does not extend is maximal. Maximal runs of at least `min_chars`
characters of the completion are reported, each confirmed by exact substring search in the document's
stored text (never an unconfirmed offset), for at most `max_documents` documents each (with the total count
of occurrences). Sentence by sentence, a span is cut to the sentence and kept while it is still
`min_chars` long, beside the datastore sources and spans of the same sentence.

Tokens are compared, not characters: a passage the model writes with a tokenization unlike its training
stream's is not found (greedy reproduction of memorised text uses the tokens it learnt).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from silo.training.index import TrainingIndex

from .types import GenerationStep, SentenceAttribution, TrainingSpan

TRACE_MIN_CHARS = 32  # shortest span reported (OutputPolicy.trace_min_chars)
TRACE_DOCUMENTS = 3  # documents listed per span


def token_runs(index: TrainingIndex, ids: Sequence[int], max_n: int = 1024) -> list[int]:
    """For each position j, how many tokens ending at j occur (in that order) in the training stream."""
    out, prev = [], 0
    for j in range(len(ids)):
        ctx = ids[max(0, j + 1 - min(prev + 1, max_n)):j + 1]
        prev = index.tokens.longest_suffix(ctx)
        out.append(prev)
    return out


def _token_spans(text: str, steps: Sequence[GenerationStep]) -> tuple[list[int], list[int], list[int]]:
    """The generated tokens' ids and each one's [start, end) characters in the completion."""
    toks = [st for st in steps if st.token >= 0]
    ids = [int(st.token) for st in toks]
    starts = [min(int(st.offset), len(text)) for st in toks]
    ends = starts[1:] + [len(text)]
    return ids, starts, ends


def trace_spans(index: TrainingIndex, text: str, steps: Sequence[GenerationStep],
                min_chars: int = TRACE_MIN_CHARS, max_documents: int = TRACE_DOCUMENTS) -> list[TrainingSpan]:
    """The maximal spans of the completion (at least `min_chars` characters) found in the training data,
    one TrainingSpan per (span, document), in text order."""
    ids, starts, ends = _token_spans(text, steps)
    runs = token_runs(index, ids)
    out = []
    for j, n in enumerate(runs):
        if n == 0 or (j + 1 < len(runs) and runs[j + 1] == n + 1):
            continue  # extended by the next token: not maximal
        a, b = starts[j - n + 1], ends[j]
        if b - a < min_chars:
            continue
        out.extend(_located(index, ids[j - n + 1:j + 1], text, a, b, max_documents))
    return sorted(out, key=lambda s: (s.start, -s.end))


def _located(index: TrainingIndex, run: Sequence[int], text: str, a: int, b: int,
             max_documents: int) -> list[TrainingSpan]:
    """The span text[a:b] (tokens `run`) in up to `max_documents` of the documents it occurs in, confirmed
    by exact search (leading/trailing spaces the document lacks are trimmed)."""
    occ = index.tokens.occurrences(run)
    count = len(occ.doc)
    out = []
    piece = text[a:b]
    lead = len(piece) - len(piece.lstrip())
    tail = len(piece) - len(piece.rstrip())
    for doc in list(dict.fromkeys(occ.doc.tolist()))[:max_documents]:
        d = index.document(doc)
        at, s, e = d.text.find(piece), a, b
        if at < 0 and piece.strip():
            s, e = a + lead, b - tail
            at = d.text.find(text[s:e])
        if at < 0:
            continue
        out.append(TrainingSpan(document_id=d.id, owner=d.owner, license=d.license, title=d.title, source=d.source,
                                url=d.url, tier=d.tier, start=s, end=e, doc_start=at, doc_end=at + e - s, count=count))
    return out


def attach_training_spans(attributions: list[SentenceAttribution], spans: list[TrainingSpan],
                          min_chars: int = TRACE_MIN_CHARS) -> None:
    """Give each sentence the spans that overlap it, cut to the sentence (kept while >= min_chars)."""
    for a in attributions:
        for sp in spans:
            s, e = max(sp.start, a.start), min(sp.end, a.end)
            if e - s >= min_chars:
                a.training.append(replace(sp, start=s, end=e, doc_start=sp.doc_start + s - sp.start,
                                          doc_end=sp.doc_start + e - sp.start))


def longest_training_span(index: TrainingIndex, text: str, steps: Sequence[GenerationStep]) -> int:
    """Characters of the longest token run of the completion found in the training data (a measure for
    benchmarks: it needs no document to be confirmed)."""
    ids, starts, ends = _token_spans(text, steps)
    runs = np.asarray(token_runs(index, ids), dtype=np.int64)
    best = 0
    for j, n in enumerate(runs.tolist()):
        if n:
            best = max(best, ends[j] - starts[j - n + 1])
    return best
