"""Membership lookup: is a document, or a passage, in the store? Answered without revealing stored text.

A passage is matched by whole sentences: the caller's text is split into sentences (the splitter that cut
the stored documents), each whitespace-normalised sentence of at least 20 characters is hashed, and the
hashes are looked up in each shard's sorted sentence-hash index (sentences.npy, built and compacted with
the shard). Nothing is ever matched by substring, so no caller can learn a character it did not send: a
sentence is found only when the caller already has all of it. Tombstoned documents are not matched. The
cost is a binary search per sentence and shard, independent of the store's size.

`LookupResult.view` decides what a caller may see: the admin (and the local CLI) every matching document;
a data owner the ids of its own documents and counts for the rest; the public counts only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from silo.core.text import sentence_spans

from .format import StoredDocument
from .removal_records import RemovalError
from .shard import MIN_SENTENCE_CHARS, normalise, sentence_hash
from .store import Datastore


@dataclass
class LookupMatch:
    shard: str
    owner: str
    document_id: str
    title: str
    match: str  # id | sentences
    matched_sentences: int
    entries: int


@dataclass
class LookupResult:
    generation: int
    in_store: bool
    query_sentences: int = 0  # the caller's sentences long enough to look up
    matched_sentences: int = 0  # of those, how many a live document holds
    matched_chars: int = 0  # their characters
    entries: int = 0  # datastore entries of the matching documents
    shards: list[str] = field(default_factory=list)
    matches: list[LookupMatch] = field(default_factory=list)

    def view(self, role: str, owner: str | None = None) -> "LookupResult":
        """What `role` may see: "admin" everything, "owner" its own documents (and totals), "public" totals."""
        if role == "admin":
            return self
        mine = [m for m in self.matches if role == "owner" and m.owner == owner]
        return LookupResult(self.generation, self.in_store, self.query_sentences, self.matched_sentences,
                            self.matched_chars, self.entries, sorted({m.shard for m in mine}), mine)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def lookup(store: Datastore | str, document_id: str | None = None, text: str | None = None) -> LookupResult:
    """Is the document, or the caller's passage, in this snapshot of the store (or the store at this path,
    opened now)? (See the module docstring.)"""
    if not isinstance(store, Datastore):
        store = Datastore.open(store)
    if (document_id is None) == (text is None):
        raise RemovalError("lookup: give exactly one of document_id or text", "document_id")
    if text is not None and not normalise(text):
        raise RemovalError("text: empty passage", "text")
    out = LookupResult(store.generation, False)
    if document_id is not None:
        matches = _id_matches(store, document_id)
    else:
        matches = _passage_matches(store, text, out)
    out.matches = matches
    out.in_store = bool(matches)
    out.shards = sorted({m.shard for m in matches})
    out.entries = sum(m.entries for m in matches)
    return out


def _id_matches(store: Datastore, document_id: str) -> list[LookupMatch]:
    """The live documents with this id, one per shard holding it."""
    matches = []
    for shard in store.shards:
        d = _by_id(shard).get(document_id)
        if d is not None and d.index not in shard.removed_docs:
            matches.append(LookupMatch(shard.name, d.owner, d.id, d.title, "id", 0, d.tokens))
    return matches


def _passage_matches(store: Datastore, text: str, out: LookupResult) -> list[LookupMatch]:
    """The live documents holding whole sentences of `text`, found by sentence hash; fills `out`'s sentence
    counts."""
    sents = {normalise(text[a:b]) for a, b in sentence_spans(text)}
    sents = sorted(s for s in sents if len(s) >= MIN_SENTENCE_CHARS)
    out.query_sentences = len(sents)
    hashes = np.array([sentence_hash(s) for s in sents], dtype=np.uint64)
    found = np.zeros(len(sents), bool)
    matches = []
    for shard in store.shards:
        index = shard.sentences
        if index is None or not len(index) or not len(hashes):
            continue
        for doc, qs in _sentences_per_document(shard, index, hashes).items():
            found[list(qs)] = True
            d = shard.documents[doc]
            matches.append(LookupMatch(shard.name, d.owner, d.id, d.title, "sentences", len(qs), d.tokens))
    out.matched_sentences = int(found.sum())
    out.matched_chars = int(sum(len(s) for s, f in zip(sents, found) if f))
    return matches


def _sentences_per_document(shard, index: np.ndarray, hashes: np.ndarray) -> dict[int, set[int]]:
    """{live document: the query sentences (positions in `hashes`) it holds} from the shard's sorted index."""
    lo = np.searchsorted(index["hash"], hashes, side="left")
    hi = np.searchsorted(index["hash"], hashes, side="right")
    per_doc: dict[int, set[int]] = {}
    for qi, (a, b) in enumerate(zip(lo, hi)):
        for row in range(a, b):
            doc = int(index["doc"][row])
            if doc not in shard.removed_docs:
                per_doc.setdefault(doc, set()).add(qi)
    return per_doc


def _by_id(shard) -> dict[str, StoredDocument]:
    """The shard's documents by id (built once per loaded shard)."""
    cache = shard.__dict__.get("_by_id")
    if cache is None:
        cache = {d.id: d for d in shard.documents}
        shard.__dict__["_by_id"] = cache
    return cache
