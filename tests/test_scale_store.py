"""Stores beyond one machine: keys kept once (fp16, checksummed, carried by compaction), memory-mapped
open, parallel shard search identical to the sequential merge, and reindexing from stored keys (new
generation, atomic, crash-safe; removal, compaction and blocks keep working on the result)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest

from silo.core.files import sha256_file
from silo.datastore.blocks import BlockStore, build_blocks
from silo.datastore.format import Manifest
from silo.datastore.journal import verify_store_journal
from silo.datastore.keys_store import KEYS_FILE, exact_search, open_keys, recall_at_k
from silo.datastore.faiss_utils import coarse_identity, ivf_of
from silo.datastore.ondisk import LazyDocuments, is_mapped
from silo.datastore.reindex import index_recall, reindex_store
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalRequest
from silo.datastore.store import PARALLEL_MIN_QUERIES, Datastore, DatastoreError


@pytest.fixture
def store(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def _queries(store: Datastore, n: int = 24, seed: int = 0) -> np.ndarray:
    """Stored keys with noise (near real neighbourhoods), and a few random directions."""
    rng = np.random.default_rng(seed)
    keys = [np.asarray(open_keys(s.dir), np.float32) for s in store.shards]
    picks = [k[rng.integers(0, len(k), n // 2)] for k in keys]
    q = np.concatenate(picks)
    q = q + rng.standard_normal(q.shape).astype(np.float32) * q.std() * 0.05
    return np.ascontiguousarray(np.concatenate([q, rng.standard_normal((4, q.shape[1])).astype(np.float32)]))


def test_keys_are_kept_fp16_beside_the_index_and_checksummed(tiny_store):
    store = Datastore.open(tiny_store)
    for shard in store.shards:
        keys = open_keys(shard.dir, store.key_dim)
        assert keys.dtype == np.float16 and keys.shape == (len(shard.entries), store.key_dim)
        assert isinstance(keys, np.memmap)
        exact = shard.index.reconstruct_n(0, shard.index.ntotal)  # the Flat index holds the fp32 keys
        assert np.allclose(keys.astype(np.float32), exact, rtol=2e-3, atol=2e-3)
        info = json.loads((shard.dir / "shard.json").read_text())
        assert info["checksums"][KEYS_FILE] == sha256_file(shard.dir / KEYS_FILE)
        assert not (shard.dir / "keys.f32").exists()  # the build's scratch file is gone
        rec = store.manifest.shard(shard.name)
        assert rec.checksum == sha256_file(shard.dir / "shard.json")


def test_compaction_carries_only_the_kept_keys(store):
    before = Datastore.open(store)
    shard = next(s for s in before.shards if len(s.documents) > 1)
    victim = shard.documents[0].id
    old_keys = np.array(open_keys(shard.dir))
    keep = shard.entries["doc"] != 0
    mgr = RemovalManager(store)
    st = mgr.submit(RemovalRequest(document_ids=[victim], requester="t", reason="test"))
    mgr.compact(st.request_id)
    after = Datastore.open(store)
    new = next(s for s in after.shards if s.name == shard.name)
    assert new.dir != shard.dir and not shard.dir.exists()
    new_keys = open_keys(new.dir)
    assert len(new_keys) == len(new.entries) == int(keep.sum())
    assert np.array_equal(np.asarray(new_keys), old_keys[keep])  # bit-identical rows, order kept
    info = json.loads((new.dir / "shard.json").read_text())
    assert info["checksums"][KEYS_FILE] == sha256_file(new.dir / KEYS_FILE)
    assert after.manifest.shard(shard.name).checksum == sha256_file(new.dir / "shard.json")


def test_mmap_open_maps_instead_of_reading(store):
    mapped = Datastore.open(store)  # the default: the manifest says mmap
    assert Manifest.read(store).index.mmap is True
    read = Datastore.open(store, mmap=False)
    for m, r in zip(mapped.shards, read.shards):
        assert is_mapped(m.index) and not is_mapped(r.index)
        assert isinstance(m.entries.base, np.memmap) and not m.entries.flags.owndata  # a plain view of the map
        assert isinstance(m.documents, LazyDocuments) and m.documents._starts is None  # nothing parsed yet
        assert len(m.documents) == len(r.documents)
        assert list(m.documents) == r.documents
        assert m.documents[-1] == r.documents[-1] and m.documents[1:3] == r.documents[1:3]
    q = _queries(read)
    a, b = mapped.search(q, 16), read.search(q, 16)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances)
    # a snapshot keeps working after a removal deletes its folders (the mappings stay valid)
    owner = mapped.shards[0].owner
    mgr = RemovalManager(store)
    mgr.compact(mgr.submit(RemovalRequest(owner=owner, requester="t", reason="test")).request_id)
    assert not mapped.shards[0].dir.exists()
    assert np.array_equal(mapped.search(q, 16).ids, a.ids)
    assert mapped.document(0, len(mapped.shards[0].documents) - 1).owner == owner


def test_mapped_ivf_lists_search_like_lists_in_ram(store):
    reindex_store(store, "IVF8,Flat", train_sample=4000, nprobe=3, progress=False)
    mapped, read = Datastore.open(store), Datastore.open(store, mmap=False)
    for m, r in zip(mapped.shards, read.shards):
        assert is_mapped(m.index) and not is_mapped(r.index)
        # no prefetch threads started per search call (they cost more than the search; see ondisk.py)
        assert faiss.downcast_InvertedLists(ivf_of(m.index).invlists).prefetch_nthread == 0
    q = _queries(read)
    for k in (1, 32):
        a, b = mapped.search(q, k), read.search(q, k)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances)


def test_context_match_counts_the_unbroken_run_of_shared_tokens(tiny_store):
    """A neighbour read at its own position matches its whole context (BOS included); a changed token cuts
    the run there; other documents' entries are not taken for earlier tokens."""
    from silo.model.types import CONTEXT, context_of
    from silo.datastore.store import Neighbors

    ds, bos = Datastore.open(tiny_store), 7
    shard = ds.shards[0]
    e = np.asarray(shard.entries)
    doc = int(e["doc"][0])
    rows = np.flatnonzero(e["doc"] == doc)
    rows = rows[np.argsort(e["pos"][rows])][:40]
    assert np.array_equal(e["pos"][rows], np.arange(len(rows)))
    ids = [bos] + e["token"][rows].tolist()  # entry at pos p: input ids[p], target ids[p + 1]
    ctx = np.stack([context_of(ids, p) for p in range(len(rows))])
    nb = Neighbors(np.zeros((len(rows), 1), np.float32), e["token"][rows, None].astype(np.int32),
                   np.zeros((len(rows), 1), np.int16), rows[:, None].astype(np.int64))
    m = ds.context_match(nb, ctx, bos)[:, 0]
    assert np.array_equal(m, np.minimum(np.arange(len(rows)) + 1, CONTEXT))
    cut = ctx.copy()
    cut[:, 3] = -5  # a different token four back
    assert np.array_equal(ds.context_match(nb, cut, bos)[:, 0], np.minimum(np.arange(len(rows)) + 1, 3))
    other = ds.shards[0].entries["doc"] != doc
    if other.any():  # an entry of another document at the same position does not match past its own start
        r = int(np.flatnonzero(other & (shard.entries["pos"] == 0))[0])
        nb1 = Neighbors(nb.distances[:1], nb.tokens[:1], nb.shard[:1], np.array([[r]], np.int64))
        assert ds.context_match(nb1, ctx[5:6], bos)[0, 0] <= 1


def test_ivfpq_precomputed_table_is_bounded_and_search_unchanged(store):
    """Above the size bound the IVF-PQ table is not built at read; searches give the same neighbours."""
    from silo.datastore.ondisk import READ_FLAGS, bounded_precomputed_table

    reindex_store(store, "IVF8,PQ8", train_sample=4000, nprobe=3, progress=False)
    shard = Datastore.open(store).shards[0]
    path = str(shard.dir / "index.faiss")
    q = _queries(Datastore.open(store))
    params = faiss.SearchParametersIVF(nprobe=3)
    with_table = bounded_precomputed_table(faiss.read_index(path, READ_FLAGS))
    without = bounded_precomputed_table(faiss.read_index(path, READ_FLAGS), max_bytes=0)
    tables = [faiss.downcast_index(ivf_of(i)).precomputed_table.size() for i in (with_table, without)]
    assert tables[0] > 0 and tables[1] == 0
    assert faiss.downcast_index(ivf_of(shard.index)).precomputed_table.size() == tables[0]  # small: the store builds it
    a, b = with_table.search(q, 16, params=params), without.search(q, 16, params=params)
    assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], rtol=1e-4, atol=1e-3)


def test_lazy_documents_name_a_count_mismatch(store):
    rec = Manifest.read(store).shards[0]
    docs = LazyDocuments(store / rec.dir / "documents.jsonl", rec.documents + 1)
    with pytest.raises(DatastoreError, match="documents.jsonl: .* the manifest records"):
        docs[0]


def _search_both(ds: Datastore, q: np.ndarray, k: int):
    assert len(q) >= PARALLEL_MIN_QUERIES  # enough queries for the threads to be used
    ds.parallel = True
    a = ds.search(q, k)
    ds.parallel = False
    b = ds.search(q, k)
    return a, b


@pytest.mark.parametrize("factory", [None, "IVF8,PQ8"])
def test_parallel_search_equals_the_sequential_merge(store, factory):
    if factory:
        reindex_store(store, factory, train_sample=4000, nprobe=3, progress=False)
    ds = Datastore.open(store)
    assert len(ds.shards) >= 2
    q = _queries(ds, n=64)
    for k in (1, 16, 100):
        a, b = _search_both(ds, q, k)
        for x, y in zip((a.distances, a.tokens, a.shard, a.ids), (b.distances, b.tokens, b.shard, b.ids)):
            assert np.array_equal(x, y)
    # with tombstones (per-shard selectors) as well
    m = Manifest.read(store)
    m.shards[0].removed_docs = [0]
    m.next_generation()
    m.write(store)
    ds = Datastore.open(store)
    a, b = _search_both(ds, q, 32)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances)
    hidden = ds.shards[0].entries["doc"][a.ids[a.shard == 0]]
    assert (hidden != 0).all()


@pytest.mark.parametrize("factory", ["IVF8,PQ8", "IVF16_HNSW8,SQ8"])
def test_one_coarse_search_for_shards_with_the_same_quantizer(store, factory):
    reindex_store(store, factory, train_sample=4000, nprobe=3, progress=False)
    m = Manifest.read(store)
    m.shards[0].removed_docs = [0]  # a tombstone selector on one shard must still apply
    m.next_generation()
    m.write(store)
    ds = Datastore.open(store)
    assert len(ds.shards) >= 2 and len({s.coarse for s in ds.shards}) == 1 and ds.shards[0].coarse
    q = _queries(ds, n=64)
    assert set(ds._shared_coarse(q)) == set(range(len(ds.shards)))
    for parallel in (True, False):
        ds.parallel = parallel
        for k in (1, 32):
            ds.share_coarse = True
            a = ds.search(q, k)
            ds.share_coarse = False
            assert ds._shared_coarse(q) == {}
            b = ds.search(q, k)
            for x, y in zip((a.distances, a.tokens, a.shard, a.ids), (b.distances, b.tokens, b.shard, b.ids)):
                assert np.array_equal(x, y)
    assert (ds.shards[0].entries["doc"][a.ids[a.shard == 0]] != 0).all()
    # a quantizer trained on other keys is another identity: such shards are never grouped
    other = faiss.index_factory(ds.key_dim, factory)
    other.train(q[::-1].repeat(40, axis=0) + np.float32(0.5))
    assert coarse_identity(other) != ds.shards[0].coarse
    assert coarse_identity(faiss.read_index(str(ds.shards[1].dir / "index.faiss"))) == ds.shards[0].coarse
    assert coarse_identity(faiss.IndexFlatL2(ds.key_dim)) is None
    # the digest follows the index a shard holds now: shards given flat indexes (as serving_index.py does for
    # its exact row) are no longer grouped, and search still answers from them
    flat = []
    for s in ds.shards:
        index = faiss.IndexFlatL2(ds.key_dim)
        index.add(np.asarray(open_keys(s.dir), np.float32))
        flat.append(dataclasses.replace(s, index=index).with_removed(s.removed_docs, 1))
    ds.shards, ds.share_coarse = flat, True
    assert all(s.coarse is None for s in ds.shards) and ds._shared_coarse(q) == {}
    assert ds.search(q, 8).ids.shape == (len(q), 8)


def test_exact_search_over_stored_keys_matches_faiss(tiny_store):
    ds = Datastore.open(tiny_store)
    keys = [open_keys(s.dir) for s in ds.shards]
    q = _queries(ds)
    D, S, R = exact_search(keys, q, 10)
    flat = faiss.IndexFlatL2(ds.key_dim)
    flat.add(np.concatenate([np.asarray(k, np.float32) for k in keys]))
    D2, I2 = flat.search(q, 10)
    offsets = np.cumsum([0] + [len(k) for k in keys])
    assert np.allclose(D, D2, rtol=1e-4, atol=1e-4)
    assert recall_at_k(S, R, np.searchsorted(offsets, I2, side="right") - 1,
                       I2 - offsets[np.searchsorted(offsets, I2, side="right") - 1], 10) > 0.99


def test_reindex_from_stored_keys_is_a_new_generation(store):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Manifest.read(store).model.path)
    build_blocks(store, tok, block_tokens=32, stride=32, retrievers=("bm25",), progress=False)
    before = Manifest.read(store)
    old = Datastore.open(store)
    q = _queries(old)
    ref = old.search(q, 8)
    res = reindex_store(store, "IVF8,Flat", train_sample=4000, nprobe=8, progress=False)  # nprobe = nlist: exact
    m = Manifest.read(store)
    assert res.generation == m.generation == before.generation + 1
    assert m.index.factory == "IVF8,Flat" and m.index.quantizer == f"quantizer@g{m.generation}.faiss"
    assert (store / m.index.quantizer).exists()
    assert sorted(p.name for p in (store / "shards").iterdir()) == sorted(r.dir.split("/")[1] for r in m.shards)
    assert all(r.dir.endswith(f"@g{m.generation}") for r in m.shards)
    new = Datastore.open(store)
    for s, r in zip(new.shards, m.shards):
        info = json.loads((s.dir / "shard.json").read_text())
        assert info["index_factory"] == "IVF8,Flat" and r.checksum == sha256_file(s.dir / "shard.json")
        assert all(info["checksums"][f] == sha256_file(s.dir / f) for f in info["checksums"])
        assert is_mapped(s.index) and s.index.ntotal == r.entries
    nb = new.search(q, 8)  # IVF visiting every list over the fp16 keys: the fp32 Flat answer up to rounding
    assert np.allclose(nb.distances, ref.distances, rtol=1e-2, atol=1e-3)
    assert (nb.tokens == ref.tokens).mean() > 0.9  # near-ties may swap places
    assert index_recall(new, q, (1, 8))["recall@8"] > 0.99  # against exact search over the same stored keys
    BlockStore.open(store).search(["the"], 1, "bm25")  # blocks follow, tied to the new checksums
    events = [json.loads(x)["event"] for x in (store / "journal.jsonl").read_text().splitlines()]
    assert events[-1] == "reindex" and verify_store_journal(store)[0]

    # a lossy index: recall below exact, then removal + compaction work on the reindexed store
    res = reindex_store(store, "IVF8,PQ8", train_sample=4000, nprobe=2, progress=False)
    assert sorted(p.name for p in store.glob("quantizer*")) == [f"quantizer@g{res.generation}.faiss"]
    pq = Datastore.open(store)
    assert 0.0 < index_recall(pq, q, (8,))["recall@8"] < 1.0
    doc = pq.shards[0].documents[0].id
    mgr = RemovalManager(store)
    st = mgr.submit(RemovalRequest(document_ids=[doc], requester="t", reason="test"))
    receipt = mgr.compact(st.request_id)
    assert receipt.status == "compacted"
    after = Datastore.open(store)
    assert doc not in {d.id for s in after.shards for d in s.documents}
    assert len(open_keys(after.shards[0].dir)) == after.shards[0].index.ntotal == len(after.shards[0].entries)
    BlockStore.open(store).search(["the"], 1, "bm25")
    assert index_recall(after, q, (8,))["recall@8"] > 0.0


def test_reindex_errors_name_the_problem(store):
    gen = Manifest.read(store).generation
    with pytest.raises(DatastoreError, match="factory: 'IVF8,Bogus'"):
        reindex_store(store, "IVF8,Bogus", progress=False)
    rec = Manifest.read(store).shards[0]
    (store / rec.dir / KEYS_FILE).unlink()
    with pytest.raises(DatastoreError, match=f"{rec.name}/keys.npy: missing"):
        reindex_store(store, "Flat", progress=False)
    assert Manifest.read(store).generation == gen  # nothing changed
    assert sorted(p.name for p in (store / "shards").iterdir()) == sorted(r.name for r in Manifest.read(store).shards)


REINDEX_SCRIPT = """
import sys
from silo.datastore.reindex import reindex_store
reindex_store(sys.argv[1], "IVF8,Flat", train_sample=3000, nprobe=8, progress=False)
"""


@pytest.mark.parametrize("point", ["mid_reindex_write", "after_reindex_manifest_write"])
def test_reindex_crash_leaves_old_or_new_generation(store, point):
    gen = Manifest.read(store).generation
    env = {**os.environ, "SILO_CRASH_AT": point}
    p = subprocess.run([sys.executable, "-c", REINDEX_SCRIPT, str(store)], env=env, capture_output=True)
    assert p.returncode == 77, p.stderr.decode()[-2000:]
    ds = Datastore.open(store)
    expect = gen if point == "mid_reindex_write" else gen + 1
    assert ds.generation == expect
    assert ds.manifest.index.factory == ("Flat" if expect == gen else "IVF8,Flat")
    ds.search(np.zeros((1, ds.key_dim), np.float32), 4)
    RemovalManager(store).resume_all()  # clean-up: unreferenced folders go
    live = {r.dir.split("/")[1] for r in Manifest.read(store).shards}
    assert {p.name for p in (store / "shards").iterdir()} == live
    res = reindex_store(store, "IVF8,Flat", train_sample=3000, nprobe=8, progress=False)  # and it runs again
    assert res.generation == expect + 1
    assert len(list(store.glob("quantizer*.faiss"))) == 1


def test_reindex_command_reports_recall_and_perplexity_change(store, corpus_dir, capsys):
    from silo.cli import main

    rc = main(["datastore", "reindex", str(store), "--factory", "IVF8,SQ8", "--nprobe", "8", "--train-sample",
               "3000", "--val", str(corpus_dir / "datastore.jsonl"), "--max-tokens", "150", "--queries", "64",
               "--k", "16"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factory"] == "IVF8,SQ8" and out["generation"] == out["generation_before"] + 1
    assert set(out["recall"]) == {"recall@1", "recall@10", "recall@16"}
    assert 0.5 < out["recall"]["recall@16"] <= 1.0  # SQ8 over every list: close to exact
    assert "validation text" in out["recall_queries"]
    for dom in ("shakespeare", "gcide"):
        p = out["perplexity"][dom]
        assert p["tokens"] > 50 and p["before"] > 1 and p["after"] > 1
        assert abs(p["after"] / p["before"] - 1) < 0.25 and p["change_pct"] == pytest.approx(
            100 * (p["after"] / p["before"] - 1), abs=0.02)
    assert main(["datastore", "reindex", str(store), "--factory", "Nonsense"]) == 2
    assert "factory: 'Nonsense'" in capsys.readouterr().err
