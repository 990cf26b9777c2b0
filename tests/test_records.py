"""The typed records of stored data read back what the code writes, and what earlier versions wrote.

documents.jsonl rows are `StoredDocument`s and receipts are `Receipt`s everywhere past the file edge; their
JSON on disk (and the receipt's JSON on the gRPC wire) is unchanged, so stores and receipts written before
the records existed still read, and a round trip writes the same bytes.
"""

from __future__ import annotations

import json
import shutil

import pytest

from silo.datastore.format import DatastoreError, StoredDocument
from silo.datastore.journal import read_journal
from silo.datastore.ondisk import LazyDocuments
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import Receipt, RemovalRequest
from silo.datastore.shard import read_documents, write_documents
from silo.datastore.store import Datastore

# A row as the build has always written it (keys in this order, json.dumps(ensure_ascii=False)).
OLD_ROW = ('{"index": 3, "id": "gcide/entry-9", "owner": "gcide", "license": "GPL-3.0-or-later", "tier": "copyleft", '
           '"title": "Entry 9", "source": "debian:dict-gcide", "url": "", "domain": "gcide", "sha256": "ab12", '
           '"tokens": 17, "sentences": [[0, 12], [13, 30]], "text": "Ambit, n. — A circuit; compass."}')

# A receipt in the form the removal code wrote before the records existed (its dict, in insertion order).
OLD_RECEIPT = {
    "request_id": "doc-1",
    "request": {"kind": "documents", "owner": None, "document_ids": ["gcide/entry-9"], "shards": [],
                "requester": "rights-holder@example.org", "reason": "opt-out", "request_id": "doc-1",
                "created": "2026-11-20T10:00:00Z"},
    "status": "verified", "store": "runs/demo/store-served",
    "removed": {"shards": [{"name": "old", "owner": "old", "entries": 10, "documents": 2}],
                "documents": [{"shard": "gcide", "document_ids": ["gcide/entry-9"], "entries": 17}], "entries": 27},
    "shards_before": [{"name": "old", "dir": "shards/old", "entries": 10, "checksum": "c0"},
                      {"name": "gcide", "dir": "shards/gcide", "entries": 900, "checksum": None}],
    "shards_after": [{"name": "gcide", "dir": "shards/gcide@g3", "entries": 883, "checksum": "c2", "present": True},
                     {"name": "old", "present": False}],
    "generations": {"before": 1, "applied": 2, "compacted": 3, "current": 3},
    "timestamps": {"received": "2026-11-20T10:00:00Z", "applied": "2026-11-20T10:00:01Z",
                   "receipt": "2026-11-20T10:00:09Z"},
    "verification": {"passed": True, "probe": {"before": {"hits": 5}, "after": {"hits": 0}}},
    "journal": [{"seq": 4, "event": "removal_received", "hash": "h4"}],
}


def test_a_row_in_the_old_form_reads_and_writes_back_the_same_bytes(tmp_path):
    doc = StoredDocument.from_json(json.loads(OLD_ROW))
    assert (doc.index, doc.id, doc.owner, doc.tokens) == (3, "gcide/entry-9", "gcide", 17)
    assert doc.sentences == ((0, 12), (13, 30)) and doc.sentence(1) == doc.text[13:30] and not doc.extra
    assert json.dumps(doc.to_json(), ensure_ascii=False) == OLD_ROW
    # a row that leaves optional fields out (tools, benchmarks) reads with their defaults; unknown keys
    # are kept and written back
    sparse = StoredDocument.from_json({"index": 0, "id": "x", "owner": "o", "text": "t", "note": {"a": 1}})
    assert (sparse.title, sparse.license, sparse.tokens, sparse.sentences) == ("", "", 0, ())
    assert sparse.extra == {"note": {"a": 1}} and sparse.to_json()["note"] == {"a": 1}
    # the file edge: both readers give the same records, and a damaged row is named
    sdir = tmp_path / "shard"
    sdir.mkdir()
    (sdir / "documents.jsonl").write_text(OLD_ROW.replace('"index": 3', '"index": 0') + "\n", encoding="utf-8")
    [read] = read_documents(sdir)
    assert list(LazyDocuments(sdir / "documents.jsonl", 1)) == [read] and read.id == "gcide/entry-9"
    (sdir / "documents.jsonl").write_text('{"index": 0, "owner": "o", "text": "t"}\n', encoding="utf-8")
    with pytest.raises(DatastoreError, match=r"documents.jsonl:1: a stored document needs 'id'"):
        read_documents(sdir)


def test_a_built_store_reads_back_as_records_with_its_bytes_unchanged(tiny_store, tmp_path):
    store = Datastore.open(tiny_store, mmap=False)
    mapped = Datastore.open(tiny_store, mmap=True)
    for shard, lazy in zip(store.shards, mapped.shards):
        lines = (shard.dir / "documents.jsonl").read_text(encoding="utf-8").splitlines()
        assert all(isinstance(d, StoredDocument) for d in shard.documents)
        assert list(lazy.documents) == shard.documents  # the mapped reader and the plain one agree
        assert [json.dumps(d.to_json(), ensure_ascii=False) for d in shard.documents] == lines
        write_documents(tmp_path, shard.documents)  # the writer: the same bytes again (and sentences.npy)
        assert (tmp_path / "documents.jsonl").read_bytes() == (shard.dir / "documents.jsonl").read_bytes()
        assert (tmp_path / "sentences.npy").read_bytes() == (shard.dir / "sentences.npy").read_bytes()
    info = store.entry_info(0, 0)
    doc = store.document(0, int(store.shards[0].entries[0]["doc"]))
    assert info.document_id == doc.id and info.sentence == doc.sentence(info.sentence_index)
    assert store.summary().to_json()["shards"][0] == {"name": store.shards[0].name, "owner": store.shards[0].owner,
                                                      "entries": store.shards[0].live_entries,
                                                      "documents": len(store.shards[0].documents)}


def test_a_receipt_reads_back_equal_and_keeps_its_json(tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    shard = next(s for s in Datastore.open(store).shards if len(s.documents) > 1)
    doc = shard.documents[0]
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(document_ids=[doc.id], requester="r", reason="x", request_id="rec-1"))
    receipt = mgr.compact("rec-1")
    assert isinstance(receipt, Receipt) and receipt.status == "compacted" and receipt.passed is None
    assert receipt.removed.documents[0].document_ids == (doc.id,) and receipt.removed.entries == doc.tokens
    on_disk = json.loads((store / "receipts" / "rec-1.json").read_text(encoding="utf-8"))
    assert on_disk == receipt.to_json() and Receipt.from_json(on_disk) == receipt == mgr.receipt("rec-1")
    # the wire (GetReceipt) sends to_json's text: the keys in the order the receipt has always had them
    assert list(receipt.to_json()) == list(OLD_RECEIPT)
    assert [list(x) for x in receipt.to_json()["shards_after"]] == [["name", "dir", "entries", "checksum", "present"]]
    links = [(r.seq, r.event, r.hash) for r in read_journal(store / "journal.jsonl") if r.request_id == "rec-1"]
    assert [(x.seq, x.event, x.hash) for x in receipt.journal] == links[:len(receipt.journal)]
    # a receipt written before the records existed reads, and writes back the same JSON, key order included
    old = Receipt.from_json(json.loads(json.dumps(OLD_RECEIPT)))
    assert old.passed is True and old.shards_after[1].present is False and old.generations.compacted == 3
    assert json.dumps(old.to_json(), indent=1) == json.dumps(OLD_RECEIPT, indent=1)
