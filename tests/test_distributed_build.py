"""Distributed build under accelerate: two real CPU processes (torch.distributed, gloo) build the same store
as one process; removal, compaction, blocks, reindexing and journal verification work on the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from silo.datastore.blocks import BlockStore, build_blocks
from silo.datastore.distributed import document_shares
from silo.datastore.format import Manifest
from silo.datastore.journal import verify_store_journal
from silo.datastore.keys_store import open_keys
from silo.datastore.reindex import reindex_store
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalRequest
from silo.datastore.store import Datastore

ROOT = Path(__file__).resolve().parent.parent
TIMINGS = {"encode_seconds", "index_seconds", "processes", "config_source"}


def test_document_shares_are_contiguous_complete_and_balanced():
    sizes = {"a": [5, 5, 90, 10], "b": [30, 30, 30], "c": [1]}
    for world in (1, 2, 3, 5, 20):
        shares = document_shares(sizes, world)
        assert len(shares) == world
        for g, ns in sizes.items():
            got = [i for s in shares for i in s.get(g, range(0))]
            assert got == list(range(len(ns)))  # every document once, in order (rank order = document order)
        if world == 2:
            load = [sum(sizes[g][i] for g, r in s.items() for i in r) for s in shares]
            assert max(load) <= sum(load) / 2 + 90  # off by at most one document
    assert document_shares(sizes, 2) == document_shares(sizes, 2)  # deterministic


@pytest.fixture(scope="module")
def dist_store(tmp_path_factory, tiny_model, corpus_dir, tiny_store):
    """The tiny store's config, built by `accelerate launch` with 2 CPU processes through the CLI."""
    d = tmp_path_factory.mktemp("dist")
    cfg = {"datastore": {"model": str(tiny_model), "corpus": [str(corpus_dir / "datastore.jsonl")],
                         "output_dir": str(d / "store"), "window": 128, "stride": 96, "batch_size": 16}}
    (d / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launcher starts several processes only through MPI; its torchrun-based launcher
    # (--multi_gpu) runs CPU processes with gloo on a machine without GPUs
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", "-m", "silo.cli", "datastore", "build", "--config", str(d / "c.yaml")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1 of 2" not in p.stderr  # only the main process shows progress
    return d / "store"


def test_two_process_build_equals_the_single_process_build(dist_store, tiny_store):
    a, b = Manifest.read(tiny_store), Manifest.read(dist_store)
    assert b.build["processes"] == 2
    for m in (a, b):
        m.build = {k: v for k, v in m.build.items() if k not in TIMINGS}
        m.build["config"].pop("output_dir")
    assert a.build == b.build and a.model == b.model and a.index == b.index and a.generation == b.generation
    assert [(r.name, r.owner, r.dir, r.entries, r.documents) for r in a.shards] == \
           [(r.name, r.owner, r.dir, r.entries, r.documents) for r in b.shards]
    sa, sb = Datastore.open(tiny_store), Datastore.open(dist_store)
    for x, y in zip(sa.shards, sb.shards):
        assert np.array_equal(np.asarray(x.entries), np.asarray(y.entries))
        assert (x.dir / "documents.jsonl").read_bytes() == (y.dir / "documents.jsonl").read_bytes()
        kx, ky = np.asarray(open_keys(x.dir), np.float32), np.asarray(open_keys(y.dir), np.float32)
        assert np.allclose(kx, ky, rtol=1e-2, atol=1e-3)
        assert np.allclose(x.index.reconstruct_n(0, x.index.ntotal), y.index.reconstruct_n(0, y.index.ntotal),
                           rtol=1e-3, atol=1e-4)
        info = json.loads((y.dir / "shard.json").read_text())
        assert set(info["checksums"]) == {"index.faiss", "entries.npy", "documents.jsonl", "keys.npy", "sentences.npy"}
        assert np.array_equal(np.asarray(x.sentences), np.asarray(y.sentences))  # the Lookup index too
    assert not list(dist_store.parent.glob(".store.tmp-build-*"))  # no scratch left beside it
    assert not (dist_store / "parts").exists()
    ok, msg, n = verify_store_journal(dist_store)
    assert ok and n == 1, msg


def test_removal_compaction_blocks_and_reindex_on_the_distributed_store(dist_store, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    store = tmp_path / "store"
    shutil.copytree(dist_store, store)
    build_blocks(store, AutoTokenizer.from_pretrained(tiny_model), block_tokens=32, stride=32,
                 retrievers=("bm25",), progress=False)
    ds = Datastore.open(store)
    shard = next(s for s in ds.shards if len(s.documents) > 1)
    doc = shard.documents[1]
    mgr = RemovalManager(store)
    receipt = mgr.compact(mgr.submit(RemovalRequest(document_ids=[doc.id], requester="t", reason="t")).request_id)
    assert receipt.status == "compacted"
    after = Datastore.open(store)
    assert doc.id not in {d.id for s in after.shards for d in s.documents}
    hits = BlockStore.open(store).search([doc.text[200:400]], 5, "bm25")[0]
    assert all(h.document_id != doc.id for h in hits)
    reindex_store(store, "IVF4,Flat", train_sample=2000, nprobe=4, progress=False)
    other = next(s for s in Datastore.open(store).shards if s.name != shard.name)
    mgr.compact(mgr.submit(RemovalRequest(owner=other.owner, requester="t", reason="t")).request_id)
    final = Datastore.open(store)
    assert [s.owner for s in final.shards] == [shard.owner]
    assert final.search(np.zeros((1, final.key_dim), np.float32), 4).tokens.shape == (1, 4)
    BlockStore.open(store).search(["the king"], 1, "bm25")
    ok, msg, _ = verify_store_journal(store)
    assert ok, msg
