"""Decontamination: find held-out documents that are near-copies of text in the datastore.

Validation or test text that the store holds verbatim makes tuning pick extreme settings for verbatim
recall and makes the reported perplexity meaningless for text the store does not hold. But a document of
the store's own kind shares stock phrases with it (a dictionary's "See under", a licence header, a
formula of a manual): leaving those out empties exactly the validation that tells the gate what the
store is good for. So overlap is judged by the FRACTION of a document's 13-grams (13 lower-cased words,
the usual decontamination unit) found in a live store document: at or above `threshold` (config
`overlap_fraction`, default 0.2) the document is a near-copy and is left out (unless told to keep it);
below it the document is kept and its fraction reported. `silo eval` and the gate fit print both.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from silo.core.corpus import Document
from silo.datastore.store import Datastore

NGRAM = 13
OVERLAP_FRACTION = 0.2  # default: a document with this share of its 13-grams in the store is a near-copy
_WORD = re.compile(r"\w+")


def _grams(text: str, n: int = NGRAM) -> set[bytes]:
    words = _WORD.findall(text.lower())
    return {hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()
            for i in range(max(0, len(words) - n + 1))}


class OverlapIndex:
    """The 13-gram fingerprints of every live document of a store snapshot (8-byte hashes, in memory)."""

    def __init__(self, store: Datastore, n: int = NGRAM):
        self.n = n
        self.grams: set[bytes] = set()
        for shard in store.shards:
            for d in shard.live_documents():
                self.grams |= _grams(d.text, n)

    def shared(self, text: str) -> tuple[int, int]:
        """(13-grams of `text` found in the store, 13-grams of `text`)."""
        mine = _grams(text, self.n)
        return len(mine & self.grams), len(mine)


@dataclass
class Overlap:
    """A held-out document that shares 13-grams with the store, and whether that makes it a near-copy."""

    document_id: str
    domain: str
    shared: int  # 13-grams also in the store
    total: int
    near_copy: bool = True  # fraction >= the threshold: left out unless kept on purpose

    @property
    def fraction(self) -> float:
        return self.shared / self.total if self.total else 0.0

    def to_json(self) -> dict:
        return {"document_id": self.document_id, "domain": self.domain, "shared_13grams": self.shared,
                "of": self.total, "fraction": round(self.fraction, 4), "near_copy": self.near_copy}

    def describe(self) -> str:
        return f"{self.document_id} ({self.shared}/{self.total} = {self.fraction:.1%})"


def find_overlaps(docs: list[Document], index: OverlapIndex, threshold: float = OVERLAP_FRACTION) -> list[Overlap]:
    """Every document that shares at least one 13-gram with the store, with its fraction."""
    out = []
    for d in docs:
        shared, total = index.shared(d.text)
        if shared:
            o = Overlap(d.id, d.domain or "default", shared, total)
            o.near_copy = o.fraction >= threshold
            out.append(o)
    return out


def decontaminate(docs: list[Document], store: Datastore | None, keep: bool = False,
                  index: OverlapIndex | None = None, threshold: float = OVERLAP_FRACTION
                  ) -> tuple[list[Document], list[Overlap]]:
    """(documents to use, documents sharing 13-grams with the store). Near-copies (fraction >= `threshold`)
    are left out unless `keep`; the others are kept and reported."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"overlap_fraction must be in (0, 1] (got {threshold})")
    if store is None or not docs:
        return docs, []
    overlaps = find_overlaps(docs, index or OverlapIndex(store), threshold)
    if keep:
        return docs, overlaps
    bad = {o.document_id for o in overlaps if o.near_copy}
    return [d for d in docs if d.id not in bad], overlaps


def emptied_domains(before: list[Document], after: list[Document]) -> dict[str, int]:
    """Domains that had documents before decontamination and have none after: domain -> documents left out."""
    had: dict[str, int] = {}
    for d in before:
        had[d.domain or "default"] = had.get(d.domain or "default", 0) + 1
    left = {d.domain or "default" for d in after}
    return {dom: n for dom, n in sorted(had.items()) if dom not in left}


def overlap_lines(split: str, overlaps: list[Overlap], emptied: dict[str, int], kept: bool) -> list[str]:
    """What to print about one split's overlaps: near-copies (left out or kept), documents kept with a few
    shared phrases, and LOUDLY each domain the split lost entirely."""
    lines = []
    near = [o for o in overlaps if o.near_copy]
    few = [o for o in overlaps if not o.near_copy]
    if near:
        lines.append(f"{split}: {len(near)} near-copy document(s) of store text "
                     f"({'kept' if kept else 'left out'}): " + ", ".join(o.describe() for o in near[:10]))
    if few:
        lines.append(f"{split}: {len(few)} document(s) kept that share a few 13-grams with the store: "
                     + ", ".join(o.describe() for o in few[:10]))
    for dom, n in emptied.items():
        lines.append(f"{split}: DOMAIN {dom!r} HAS NO DOCUMENTS LEFT: all {n} were left out as near-copies of the "
                     "store; it is not measured on this split (pass --keep-overlap to keep them)")
    return lines
