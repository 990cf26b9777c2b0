"""Opt-out integrity at the library level (issue: opt-out that holds): rebuilds keep removals, Lookup reads
no text, generations only move forward, reuse by checksum, selector-less indexes, domain-sharded owners,
a build serialised with removals, attribution on the generating snapshot. Real tiny model, real stores."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from conftest import wait_for_lock_waiter

from silo.core.config import validate
from silo.datastore.blocks import build_blocks
from silo.datastore.build import DatastoreConfig, build_datastore
from silo.datastore.format import LOCK_FILE, Manifest, StaleGeneration, store_lock
from silo.datastore.journal import verify_store_journal
from silo.datastore.lookup import lookup
from silo.datastore.removal import RemovalManager
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.model.sampling import SamplingParams


@pytest.fixture
def store(tiny_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def build_cfg(tiny_model, corpus_dir, out, **over):
    return validate(DatastoreConfig, {"model": str(tiny_model), "corpus": [str(corpus_dir / "datastore.jsonl")],
                                      "output_dir": str(out), "window": 128, "stride": 96, "overwrite": True, **over})


def a_sentence(store_path, domain="shakespeare", min_chars=60):
    ds = Datastore.open(store_path)
    for shard in ds.shards:
        for d in shard.documents:
            if d.domain == domain:
                for a, b in d.sentences:
                    s = d.text[a:b]
                    if len(s) >= min_chars and "\n" not in s:
                        return d, s
    raise AssertionError("no sentence")


def test_rebuild_keeps_every_opt_out(store, tiny_model, corpus_dir):
    first = Manifest.read(store)
    doc, _ = a_sentence(store)
    mgr = RemovalManager(store)
    mgr.submit({"owner": "gcide", "requester": "r", "reason": "opt-out", "request_id": "own"})
    mgr.submit({"document_ids": [doc.id], "requester": "r", "reason": "opt-out", "request_id": "doc"})
    mgr.compact("doc")
    before = Manifest.read(store)
    new = build_datastore(build_cfg(tiny_model, corpus_dir, store), progress=False)
    # the rebuild from the very same corpus leaves out what the owners removed ...
    assert [s.owner for s in new.shards] == ["shksprdata"]
    assert doc.id not in {d.id for s in new.shards for d in s.documents}
    # ... keeps the records, receipts and journal, continues the generations and the lineage
    assert sorted(p.stem for p in (store / "removals").glob("*.json")) == ["doc", "own"]
    assert (store / "receipts" / "doc.json").exists()
    after = Manifest.read(store)
    assert after.generation > before.generation and after.lineage == first.lineage
    ok, msg, _ = verify_store_journal(store)
    assert ok, msg
    last = (store / "journal.jsonl").read_text().splitlines()[-1]
    assert '"bound_by": ["doc", "own"]' in last
    # a second rebuild is bound the same way
    again = build_datastore(build_cfg(tiny_model, corpus_dir, store), progress=False)
    assert [s.owner for s in again.shards] == ["shksprdata"] and again.generation > after.generation


def test_lookup_reveals_no_text(store):
    doc, sentence = a_sentence(store)
    whole = lookup(store, text=sentence)
    assert whole.in_store and whole.matched_sentences == 1 and {m.document_id for m in whole.matches} == {doc.id}
    # growing a prefix one character at a time learns nothing until the whole sentence is sent
    for n in range(8, len(sentence), 7):
        part = lookup(store, text=sentence[:n])
        assert not part.in_store and not part.matches and part.matched_chars == 0
    # a single letter lists nothing
    res = lookup(store, text="e")
    assert not res.in_store and res.matches == [] and res.query_sentences == 0
    # what a public caller sees of a hit: counts of its own passage, no ids, owners or shards
    public = whole.view("public")
    assert public.in_store and public.matched_sentences == 1 and not public.matches and not public.shards
    assert whole.view("owner", doc.owner).matches and not whole.view("owner", "someone-else").matches
    # a tombstoned document is never matched, before compaction too
    RemovalManager(store).submit({"document_ids": [doc.id], "requester": "r", "reason": "x"})
    assert not lookup(store, text=sentence).in_store
    assert not lookup(store, document_id=doc.id).in_store


def test_stale_snapshot_is_refused(store, tiny_model):
    lm = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    old = lm.store
    RemovalManager(store).submit({"owner": "gcide", "requester": "r", "reason": "x"})
    assert lm.reload_store()
    with pytest.raises(StaleGeneration, match="only move forward"):
        lm.swap_store(old)
    assert "gcide" not in {s.owner for s in lm.store.shards}


def test_reload_after_rebuild_reuses_nothing_stale(store, tiny_model, corpus_dir):
    lm = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    doc, sentence = a_sentence(store)
    gen0 = lm.store.generation
    mgr = RemovalManager(store)
    mgr.submit({"document_ids": [doc.id], "requester": "r", "reason": "x", "request_id": "d"})
    mgr.compact("d")
    # rebuilt at the same path: shard folders of the same names come back with other content
    build_datastore(build_cfg(tiny_model, corpus_dir, store), progress=False)
    assert lm.reload_store() and lm.store.generation > gen0 + 1
    assert doc.id not in {d.id for s in lm.store.shards for d in s.documents}
    assert not lookup(lm.store, text=sentence).in_store


def test_selectorless_index_serves_with_tombstones(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "pq"
    build_datastore(build_cfg(tiny_model, corpus_dir, out, overwrite=False,
                              index={"factory": "PQ8", "train_sample": 4000}), progress=False)
    doc, _ = a_sentence(out)
    RemovalManager(out).submit({"document_ids": [doc.id], "requester": "r", "reason": "x"})
    ds = Datastore.open(out)
    shard_i = next(i for i, s in enumerate(ds.shards) if doc.index in s.removed_docs)
    keys = ds.shards[shard_i].index.reconstruct_n(0, 200)
    nb = ds.search(keys, 16)
    assert (nb.tokens >= 0).all()
    hit_docs = ds.shards[shard_i].entries["doc"][nb.ids[nb.shard == shard_i]]
    assert doc.index not in set(hit_docs.tolist())


def test_domain_sharded_owner_follows_own_removal(tmp_path, tiny_model, corpus_dir):
    out = tmp_path / "by-domain"
    build_datastore(build_cfg(tiny_model, corpus_dir, out, overwrite=False, shard_by="domain"), progress=False)
    doc, _ = a_sentence(out)
    st = RemovalManager(out).submit({"document_ids": [doc.id], "requester": doc.owner, "reason": "mine"})
    assert all(t.owner == "" for t in st.targets.drop_documents)  # domain shards belong to no owner
    assert doc.owner in st.owners()  # ... yet the request is about this owner's content


def test_block_build_waits_for_the_store_lock(store, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    done = threading.Event()
    with store_lock(store):
        t = threading.Thread(target=lambda: (build_blocks(store, tok, 32, 32, ["bm25"], progress=False), done.set()))
        t.start()
        wait_for_lock_waiter(store / LOCK_FILE)  # the build is blocked on the store's lock ...
        assert not done.is_set()  # ... while a removal or compaction in progress holds the store
    t.join(120)
    assert done.is_set()


def test_attribution_uses_the_generating_snapshot(store, tiny_model):
    from silo.research.snapshots import without_owners

    lm = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    gdoc = next(d for s in lm.store.shards if s.owner == "gcide" for d in s.documents)
    knn = lm.retriever("knn", k=16, lmbda=0.9, tau=0.05)
    generation = lm.generate(gdoc.text[:150], SamplingParams(max_new_tokens=16, temperature=0), knn)
    for _ in generation:
        pass
    lm.swap_store(without_owners(lm.store, {"gcide"}))  # the server swapped meanwhile
    atts = lm.attribute(generation.completion, knn)
    assert any(src.owner == "gcide" for a in atts for src in a.sources)
    # shares account for everything: parametric + listed sources + the rest below the cut
    from silo.model.attribution import attribute_steps

    for a in attribute_steps(generation.completion.text, generation.completion.steps, knn.store, max_sources=1):
        assert a.parametric_share + sum(s.share for s in a.sources) + a.other_share == pytest.approx(1.0, abs=1e-6)
    assert any(a.other_share > 0 for a in attribute_steps(generation.completion.text, generation.completion.steps,
                                                          knn.store, max_sources=1))
    assert np.isfinite(generation.completion.steps[0].support.p)
