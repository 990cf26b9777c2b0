"""The inf-gram mode on a real tiny store: per-shard suffix arrays built from the entries, the gate fitted by
the kNN gate's machinery, scoring and generation with attribution, and owner / document removal dropping or
rebuilding the owner's index under the removal workflow's verification."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def infstore(tmp_path_factory, tiny_model, tiny_store, corpus_dir):
    """(LM over a copy of the tiny store with inf-gram indexes and fitted inf-gram gates, store path)."""
    from silo.core.config import validate
    from silo.core.corpus import write_jsonl, load_documents
    from silo.datastore.infgram import build_infgram
    from silo.model.lm import SiloLM
    from silo.workflows.gate_fit import GateConfig, fit_store_gate
    from silo.workflows.infgram_fit import fit_store_infgram

    d = tmp_path_factory.mktemp("infstore")
    store = d / "store"
    shutil.copytree(tiny_store, store)
    lm = SiloLM.load(str(tiny_model), str(store))
    build_infgram(store, lm.tokenizer.eos_token_id, progress=False)
    # validation: other passages of the store's owners and of the training text
    docs = load_documents(str(corpus_dir / "datastore.jsonl")) + load_documents(str(corpus_dir / "train.jsonl"))[:3]
    for x in docs:
        x.text, x.domain = x.text[-1500:], x.domain or "train"
    write_jsonl(docs, d / "val.jsonl")
    cfg = validate(GateConfig, {"model": str(tiny_model), "store": str(store), "val": [str(d / "val.jsonl")],
                                "max_tokens": 300, "k": [16], "lm_samples": 128, "keep_overlap": True})
    lm = SiloLM.load(str(tiny_model), str(store))
    if not (store / "gate.json").exists():
        fit_store_gate(cfg, lm=lm, progress=False)
        lm.swap_store(lm.store)
    fit_store_infgram(cfg, lm=lm, progress=False)
    return lm, store


def test_each_shard_holds_its_own_index_built_from_its_entries(infstore):
    from silo.datastore.infgram import StoreNgrams, shard_streams

    lm, store = infstore
    ng = StoreNgrams(lm.store)
    for s, shard in enumerate(lm.store.shards):
        info = json.loads((shard.dir / "infgram" / "infgram.json").read_text())
        assert info["tokens"] == len(shard.entries) + len(shard.documents) + 1  # a separator per document + 1
        assert info["shard_checksum"] == lm.store.manifest.shard(shard.name).checksum
        toks, rows = shard_streams(np.asarray(shard.entries), len(shard.documents))
        run = toks[0][100:116].tolist()
        hits = ng.document_hits(run)
        assert (s, 0) in hits
        sh, en = ng.voters([lm.tokenizer.eos_token_id] + toks[0][:100].tolist(), 8, int(toks[0][100]))
        assert len(en) and all(shard.entries["doc"][e] == 0 for e, x in zip(en, sh) if x == s)
    assert 8 < ng.nbytes() / ng.tokens < 20  # a few bytes per token (kNN: 2 x key_dim bytes per entry)


def test_infgram_scores_stored_text_better_and_the_gate_is_checked(infstore):
    from silo.model.infgram import load_gates

    lm, _ = infstore
    gates = load_gates(lm.store)
    assert set(gates) == {"lm", "knn"}
    for g in gates.values():
        assert g.mode in ("gated", "fixed", "parametric") and g.report["check"]["held_out"]
        if g.mode == "gated":
            assert not g.report["check"]["failures"]
    assert {"infgram", "knn+infgram"} <= set(lm.modes())
    stored = lm.store.shards[0].documents[0].text[3000:4500]
    res = lm.score([stored], "infgram")[0]
    assert res.mode == "infgram" and res.store_generation == lm.store.generation
    if gates["lm"].mode != "parametric":
        assert res.perplexity < res.perplexity_parametric and res.lmbda.max() > 0
    both = lm.score([stored], lm.retriever("knn+infgram"))[0]
    assert both.mode == "knn+infgram" and np.isfinite(both.perplexity)


def test_generation_names_the_documents_that_carried_it(infstore):
    from silo import SamplingParams
    from silo.model.infgram import InfgramGate, InfgramRetriever

    lm, _ = infstore
    doc = lm.store.shards[0].documents[0]
    ngrams, _, _ = lm.ngrams()
    always = InfgramGate(base="lm", mean=[0.0] * 9, std=[1.0] * 9, weights=[0.0] * 9, bias=0.0, mode="fixed",
                         fixed_lambda=0.9)
    r = InfgramRetriever(lm.store, ngrams, always, lm.vocab_size)
    end = doc.text.find(" ", 2150)  # a prompt that ends on a whole word reads as the store's stream does
    comp = lm.complete(doc.text[2000:end], SamplingParams(max_new_tokens=24, temperature=0), r)
    assert comp.mode == "infgram"
    sources = [s for a in comp.attributions for s in a.sources]
    assert doc.id in {s.document_id for s in sources}  # it continues the stored passage, from its own document
    assert comp.text[:30] in doc.text[end - 5:end + 200], comp.text  # verbatim, from the store
    from silo.model.output_policy import OutputPolicy

    capped = lm.complete(doc.text[2000:end], SamplingParams(max_new_tokens=24, temperature=0), r,
                         policy=OutputPolicy.model_validate({"all": {"max_verbatim_chars": 30}}))
    from test_trace import longest_common_substring

    assert longest_common_substring(capped.text, doc.text) <= 30


def test_owner_removal_drops_the_owners_index_and_the_probe_counts_zero(infstore, tiny_model, tmp_path):
    from silo.datastore.infgram import StoreNgrams
    from silo.datastore.store import Datastore
    from silo.model.lm import SiloLM
    from silo.workflows.removal import remove_and_verify

    lm0, store0 = infstore
    store = tmp_path / "store"
    shutil.copytree(store0, store)
    lm = SiloLM.load(str(tiny_model), str(store))
    gone = lm.store.shards[0].dir
    owner = lm.store.shards[0].owner
    doc = lm.store.shards[0].documents[0]
    ids = lm.encode(doc.text[500:700])[:12]
    assert any(lm.store.document(s, d).owner == owner for s, d in StoreNgrams(lm.store).document_hits(ids))
    receipt = remove_and_verify(lm, {"owner": owner, "requester": "test", "reason": "opt-out"}, progress=False)
    v = receipt.verification
    assert v["infgram"]["passed"] and v["infgram"]["removed_hits"] == 0 and v["infgram"]["ngrams"] > 0
    after = Datastore.open(store)
    assert owner not in {s.owner for s in after.shards}
    assert all(after.document(s, d).owner != owner for s, d in StoreNgrams(after).document_hits(ids))
    assert not gone.exists()  # the shard's folder, its inf-gram index with it


def test_document_removal_hides_then_rebuilds_the_shards_index(infstore, tmp_path):
    from silo.datastore.infgram import StoreNgrams
    from silo.datastore.removal import RemovalManager
    from silo.datastore.store import Datastore

    _, store0 = infstore
    store = tmp_path / "store"
    shutil.copytree(store0, store)
    before = Datastore.open(store)
    shard = before.shards[-1]
    doc = shard.documents[0]
    run = np.asarray(shard.entries["token"][np.asarray(shard.entries["doc"]) == 0][200:212]).tolist()
    assert (len(before.shards) - 1, 0) in StoreNgrams(before).document_hits(run)
    mgr = RemovalManager(store)
    state = mgr.submit({"document_ids": [doc.id], "requester": "test", "reason": "opt-out"})
    applied = Datastore.open(store)  # tombstoned, not yet compacted: hidden at query time
    assert all(applied.document(s, d).id != doc.id for s, d in StoreNgrams(applied).document_hits(run))
    mgr.compact(state.request_id)
    compacted = Datastore.open(store)
    sdir = compacted.shards[-1].dir
    assert "@g" in sdir.name and (sdir / "infgram" / "infgram.json").exists()
    info = json.loads((sdir / "infgram" / "infgram.json").read_text())
    assert info["shard_checksum"] == compacted.manifest.shard(shard.name).checksum
    assert info["documents"] == len(shard.documents) - 1
    assert all(compacted.document(s, d).id != doc.id for s, d in StoreNgrams(compacted).document_hits(run))


def test_report_adds_infgram_rows_and_plots_perplexity_against_bytes(infstore, tiny_model, tmp_path):
    """`silo report` on a store with inf-gram indexes and gates: the inf-gram columns per test domain, the
    bytes each mode's files take on disk (checked against the files themselves) and the plot."""
    import math

    import yaml

    from silo.cli import main
    from silo.datastore.store import Datastore
    from silo.research import load_research
    from silo.research.tables import main_rows
    from silo.workflows.evaluate import DomainResult, EvalResult

    _, store0 = infstore
    store = tmp_path / "store"
    shutil.copytree(store0, store)  # the report builds BM25 blocks into it
    out = tmp_path / "report"
    cfg = {"eval": {"model": str(tiny_model), "store": str(store), "reference_model": str(tiny_model),
                    "val": ["pkg:demo/val"], "test": ["pkg:demo/test"], "domains": ["shakespeare", "gcide"],
                    "max_tokens": 120, "grid": {"k": [8], "lmbda": [0.0, 0.3], "tau": [1.0]},
                    "ric": {"retrievers": ["bm25"]}, "output_dir": str(tmp_path / "eval")},
           "research": {"output_dir": str(out), "blocks": {"block_tokens": 32, "stride": 16, "retrievers": ["bm25"]},
                        "sweep": {"ric_blocks": [1], "ric_ensemble": [False]}, "scaling": {"enabled": False},
                        "owner_effect": {"enabled": False}}}
    path = tmp_path / "research.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["report", "--config", str(path)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert {r["domain"] for r in results} == {"shakespeare", "gcide"}
    for r in results:
        for col in ("inf-gram", "kNN-LM + inf-gram", "kNN-LM gated", "RIC-LM (bm25)"):
            assert isinstance(r[col], float) and math.isfinite(r[col]) and r[col] > 1, (col, r)
    inf = json.loads((out / "infgram_rows.json").read_text())
    assert set(inf["gates"]) == {"infgram", "knn+infgram"} and not inf["absent"]
    assert all(0 <= row["infgram mean λ"] <= 1 for row in inf["domains"].values())

    # bytes per mode: the sum of the real files in every shard folder, per stored token (entries.npy rows)
    shards = [s.dir for s in Datastore.open(store).shards]
    size = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
    knn = size(d / f for d in shards for f in ("index.faiss", "entries.npy", "keys.npy"))
    ig = size(d / "infgram" / f for d in shards for f in ("tokens.bin", "table.idx", "rows.npy", "starts.npy"))
    bm25 = size([d / "blocks" / "blocks.jsonl" for d in shards] + [p for d in shards
                                                                   for p in (d / "blocks" / "bm25").rglob("*") if p.is_file()])
    tokens = sum(len(np.load(d / "entries.npy", mmap_mode="r")) for d in shards)
    by = {r["mode"]: r for r in json.loads((out / "bytes.json").read_text())}
    expect = {"kNN-LM": knn, "RIC-LM (bm25)": bm25, "inf-gram": ig, "kNN-LM + inf-gram": knn + ig}
    assert set(by) == {"parametric", *expect}  # no dense blocks were built: RIC-LM (dense) is left out
    for mode, want in expect.items():
        assert want > 0 and by[mode]["bytes"] == want, mode
        assert by[mode]["bytes per token"] == pytest.approx(want / tokens)
        assert math.isfinite(by[mode]["mean perplexity"]), mode
    assert by["inf-gram"]["bytes per token"] < by["kNN-LM"]["bytes per token"]  # a few bytes against the keys
    assert by["inf-gram"]["mean perplexity"] == pytest.approx(np.mean([r["inf-gram"] for r in results]))
    assert by["kNN-LM"]["column"] == "kNN-LM gated"
    assert (out / "perplexity_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "perplexity_vs_bytes.png" in md and "RIC-LM (dense): left out: no RIC-LM (dense) blocks" in md

    # the gap closed of the inf-gram columns is computed as for the other rows, given a better reference
    ev, _ = load_research(path)
    rows = inf
    dom = next(iter(rows["domains"]))
    d = DomainResult(domain=dom, tokens=rows["domains"][dom]["tokens"], parametric=1000.0, reference=500.0)
    res = EvalResult(model=ev.model, store=ev.store, reference_model=None, store_entries=0, window=1, stride=1,
                     max_tokens=ev.max_tokens, tuned=False, domains=[d])
    row = main_rows(res, None, rows)[0]
    v = rows["domains"][dom]["infgram"]
    assert row["inf-gram"] == v and row["gap closed inf-gram"] == f"{100 * (1000 - v) / 500:.0f}%"
