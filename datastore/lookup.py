"""Membership lookup: is a document, or a passage, in the store?"""

from __future__ import annotations

from pathlib import Path

from silo.core.text import split_sentences

from .format import Manifest
from .removal_records import RemovalError
from .shard import read_documents


def _norm(text: str) -> str:
    return " ".join(text.split())


def lookup(store_path: str | Path, document_id: str | None = None, text: str | None = None,
           min_sentence_chars: int = 20) -> dict:
    """Is it in the store? By document id, or by text: documents whose whitespace-normalised text
    contains the passage, or that share a sentence of it (sentences of at least `min_sentence_chars`
    characters, so "Ay." matches nothing). Each match names shard, owner, document and entry count;
    documents removed but not compacted yet are reported with ``live: false``."""
    if (document_id is None) == (text is None):
        raise RemovalError("lookup: give exactly one of document_id or text", "document_id")
    if text is not None and not _norm(text):
        raise RemovalError("text: empty passage", "text")
    store_path = Path(store_path)
    manifest = Manifest.read(store_path)
    passage = _norm(text) if text is not None else ""
    qsents = {_norm(s) for s in split_sentences(text)} if text is not None else set()
    qsents = {s for s in qsents if len(s) >= min_sentence_chars}
    matches = []
    for rec in manifest.shards:
        removed = set(rec.removed_docs)
        for d in read_documents(store_path / rec.dir):
            how, n_sent = None, 0
            if document_id is not None:
                how = "id" if d["id"] == document_id else None
            else:
                if passage in _norm(d["text"]):
                    how = "passage"
                if qsents:
                    n_sent = len(qsents & {_norm(d["text"][a:b]) for a, b in d["sentences"]})
                    how = how or ("sentences" if n_sent else None)
            if how:
                matches.append({"shard": rec.name, "owner": d["owner"], "document_id": d["id"],
                                "doc_index": d["index"], "title": d.get("title", ""), "match": how,
                                "matched_sentences": n_sent, "entries": int(d["tokens"]),
                                "live": d["index"] not in removed})
    live = [m for m in matches if m["live"]]
    out = {"generation": int(manifest.generation), "in_store": bool(live),
           "shards": sorted({m["shard"] for m in live}), "entries": sum(m["entries"] for m in live),
           "matches": matches}
    if text is not None:
        out["query_sentences"] = len(qsents)
    return out

