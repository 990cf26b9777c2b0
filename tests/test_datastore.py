"""The sharded FAISS store: round trip, provenance of every entry, fingerprint check, atomic layout."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from silo.datastore.journal import verify_journal
from silo.datastore.keys import KeyExtractor, window_plan
from silo.core.models import load_lm
from silo.datastore.build import DatastoreConfig, build_datastore
from silo.datastore.store import Datastore, DatastoreError, FingerprintMismatch
from silo.core.config import validate
from silo.core.corpus import load_documents


def test_window_plan_covers_every_position_once():
    for n, w, s in [(1, 8, 4), (7, 8, 4), (8, 8, 4), (9, 8, 4), (100, 16, 12), (50, 10, 10)]:
        plan = window_plan(n, w, s)
        covered = [p for b, e, f in plan for p in range(f, e)]
        assert covered == list(range(n))
        assert all(e - b <= w and b <= f for b, e, f in plan)
        # after the first window every new position has at least w - s tokens of context
        assert all(f - b >= w - s for b, e, f in plan[1:])


def test_store_round_trip_and_every_entry_maps_to_a_sentence(tiny_store, tiny_model, corpus_dir):
    store = Datastore.open(tiny_store)
    manifest = json.loads((tiny_store / "manifest.json").read_text())
    assert manifest["generation"] == 1 and manifest["index"]["factory"] == "Flat"
    owners = {s.owner for s in store.shards}
    assert owners == {d.owner for d in load_documents(str(corpus_dir / "datastore.jsonl"))}
    for shard in store.shards:
        info = json.loads((shard.dir / "shard.json").read_text())
        assert info["entries"] == len(shard.entries) == shard.index.ntotal
        assert (shard.entries["doc"] >= 0).all() and (shard.entries["doc"] < len(shard.documents)).all()
        for doc_i, doc in enumerate(shard.documents):
            rows = shard.entries[shard.entries["doc"] == doc_i]
            assert len(rows) == doc.tokens > 0
            assert (rows["sent"] >= 0).all() and (rows["sent"] < len(doc.sentences)).all()
    ok, msg, n = verify_journal(tiny_store / "journal.jsonl")
    assert ok and n == 1, msg

    # Re-encode one stored document with the model: each key's nearest neighbour is itself.
    model, tok = load_lm(str(tiny_model))
    shard = store.shards[0]
    doc = shard.documents[0]
    ex = KeyExtractor(model, tok, window=128, stride=96)
    dk = next(ex.iter_documents([doc.text]))
    nb = store.search(dk.keys[:50], k=4)
    assert (nb.distances[:, 0] < 1e-3).all()
    assert (nb.tokens[:, 0] == dk.next_tokens[:50]).all()
    info = store.entry_info(int(nb.shard[0, 0]), int(nb.ids[0, 0]))
    assert info.document_id == doc.id and info.owner == shard.owner
    assert info.sentence and info.sentence in doc.text


def test_search_merges_shards_by_distance(tiny_store):
    store = Datastore.open(tiny_store)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((5, store.key_dim)).astype(np.float32)
    nb = store.search(q, k=16)
    assert (np.diff(nb.distances, axis=1) >= 0).all()
    # brute force over all shards gives the same top distances
    allkeys = []
    for s in store.shards:
        allkeys.append(s.index.reconstruct_n(0, s.index.ntotal))
    flat = faiss.IndexFlatL2(store.key_dim)
    flat.add(np.concatenate(allkeys))
    D, _ = flat.search(q, 16)
    assert np.allclose(D, nb.distances, rtol=1e-4, atol=1e-3)


def test_missing_shard_file_is_named(tiny_store, tmp_path):
    import shutil

    from silo.datastore.store import ShardMissing

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    victim = next((store / "shards").iterdir()) / "index.faiss"
    victim.unlink()
    with pytest.raises(ShardMissing, match=str(victim)):
        Datastore.open(store)


def test_fingerprint_mismatch_is_refused(tiny_store):
    with pytest.raises(FingerprintMismatch, match="rebuild the store"):
        Datastore.open(tiny_store, fingerprint="sha256:" + "0" * 64)


def test_build_refuses_to_clobber_and_ivfpq_option(tmp_path, tiny_model, corpus_dir, tiny_store):
    base = dict(model=str(tiny_model), corpus=[str(corpus_dir / "datastore.jsonl")], window=128, stride=96)
    cfg = validate(DatastoreConfig, {**base, "output_dir": str(tiny_store)})
    with pytest.raises(DatastoreError, match="already holds a store"):
        build_datastore(cfg, progress=False)
    cfg = validate(DatastoreConfig, {**base, "output_dir": str(tmp_path / "pq"),
                                     "index": {"factory": "IVF16,PQ8", "nprobe": 4, "train_sample": 5000}})
    store = build_datastore(cfg, progress=False)
    assert (tmp_path / "pq" / "quantizer.faiss").exists()
    assert store.num_entries == Datastore.open(tiny_store).num_entries
    nb = store.search(np.zeros((2, store.key_dim), np.float32), k=8)
    assert nb.tokens.shape == (2, 8) and (nb.tokens >= 0).all()
    # no temporary folders are left beside the store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pq"]


def test_bad_datastore_config_names_field():
    from silo.core.config import ConfigError

    with pytest.raises(ConfigError, match="datastore: invalid config"):
        validate(DatastoreConfig, {"model": "m", "corpus": ["c"], "output_dir": "o", "window": 8, "stride": 9},
                 prefix="datastore", source="datastore")
    with pytest.raises(DatastoreError, match="not a datastore"):
        Datastore.open("/nonexistent/store")
