"""Decontamination: find held-out documents that share long spans with the datastore.

Validation or test text that the store holds verbatim (near-duplicate passages, quotations, boilerplate)
makes tuning pick extreme settings for verbatim recall and makes the reported perplexity meaningless for
text the store does not hold. A document overlaps when it shares at least one 13-word span (a 13-gram of
lower-cased word tokens, the usual decontamination unit) with a live store document; `silo eval` and the
gate fit report such documents and leave them out unless told to keep them (`--keep-overlap`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from silo.core.corpus import Document
from silo.datastore.store import Datastore

NGRAM = 13
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
                self.grams |= _grams(d["text"], n)

    def shared(self, text: str) -> tuple[int, int]:
        """(13-grams of `text` found in the store, 13-grams of `text`)."""
        mine = _grams(text, self.n)
        return len(mine & self.grams), len(mine)


@dataclass
class Overlap:
    document_id: str
    domain: str
    shared: int  # 13-grams also in the store
    total: int

    def to_json(self) -> dict:
        return {"document_id": self.document_id, "domain": self.domain, "shared_13grams": self.shared,
                "of": self.total}


def find_overlaps(docs: list[Document], index: OverlapIndex) -> list[Overlap]:
    out = []
    for d in docs:
        shared, total = index.shared(d.text)
        if shared:
            out.append(Overlap(d.id, d.domain or "default", shared, total))
    return out


def decontaminate(docs: list[Document], store: Datastore | None, keep: bool = False,
                  index: OverlapIndex | None = None) -> tuple[list[Document], list[Overlap]]:
    """(documents to use, overlapping documents found). With `keep`, the overlaps are reported but kept."""
    if store is None or not docs:
        return docs, []
    overlaps = find_overlaps(docs, index or OverlapIndex(store))
    if keep:
        return docs, overlaps
    bad = {o.document_id for o in overlaps}
    return [d for d in docs if d.id not in bad], overlaps
