"""The gated kNN-LM mixture on the tiny real model and store: fitting, falling back to the LM where the
store does not hold the text, shrinking when a shard leaves, decontamination and boundary warnings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from silo.core.corpus import Document, load_documents, write_jsonl
from silo.datastore.store import Datastore
from silo.model.gate import Gate
from silo.model.lm import SiloLM
from silo.model.sampling import SamplingParams
from silo.research.snapshots import without_owners
from silo.workflows.decontam import OverlapIndex, decontaminate, find_overlaps
from silo.workflows.gate_fit import GateConfig, fit_store_gate

VAL = ["pkg:demo/val"]  # other plays, other dictionary chunks, Python and Bible text: not in the tiny store


@pytest.fixture(scope="module")
def gated(tmp_path_factory, tiny_model, tiny_store):
    import shutil

    store = tmp_path_factory.mktemp("gate") / "store"
    shutil.copytree(tiny_store, store)
    cfg = GateConfig(model=str(tiny_model), store=str(store), val=VAL, domains=["shakespeare", "gcide", "python"],
                     max_tokens=700, k=[4, 16, 64], window=128, stride=64)
    gate, report = fit_store_gate(cfg, progress=False)
    lm = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    return lm, gate, report


def ppl(x):
    return math.exp(-np.mean(x))


def test_gate_is_fitted_saved_and_served(gated, tiny_model):
    lm, gate, report = gated
    saved = Gate.load(lm.store)
    assert saved is not None and saved.k == gate.k in (4, 16, 64) and saved.fingerprint == lm.fingerprint
    assert saved.generation == lm.store.generation and saved.tau > 0
    assert set(report["domains"]) == {"shakespeare", "gcide", "python", "lm-samples"}  # + text the LM wrote
    assert gate.mode == "gated" and not report["check"]["failures"] and gate.lambda_max < 1
    r = lm.retriever("knn")  # the LM's default settings ask for the gate
    assert r.mixture.kind == "gated" and r.k == gate.k
    assert lm.retriever("knn", lmbda=0.5).mixture.kind == "fixed"  # explicit settings: the fixed mixture
    # the fit maximised validation likelihood: no domain's validation perplexity got worse than the LM's by much,
    # and the store's own domains gained
    for dom, row in report["domains"].items():
        assert row["gated"] <= row["parametric"] * 1.02, (dom, row)
    assert report["domains"]["gcide"]["gated"] < report["domains"]["gcide"]["parametric"]


def test_a_gate_and_configs_written_before_tau_was_named_tau_still_read(gated, tmp_path):
    """gate.json v2 and YAML sections called p_kNN's bandwidth `temperature`; they read as `tau`."""
    import json

    from silo.model.knn import KNNConfig
    from silo.workflows.tuning import GridConfig

    lm, gate, _ = gated
    old = gate.to_json()
    old["temperature"] = old.pop("tau")
    old["format"] = "silo.gate.v2"
    (tmp_path / "gate.json").write_text(json.dumps(old))
    again = Gate.load(tmp_path)
    assert again.tau == gate.tau and again.format == "silo.gate.v2" and again.to_json()["format"] == "silo.gate.v4"
    # a v3 gate has no lambda bound, mode or fallback: it reads as a gate whose lambda stays below 1
    v3 = {k: v for k, v in gate.to_json().items()
          if k not in ("lambda_max", "mode", "fixed_lambda", "fallback", "scale_source")}
    (tmp_path / "gate.json").write_text(json.dumps({**v3, "format": "silo.gate.v3"}))
    old3 = Gate.load(tmp_path)
    assert old3.mode == "gated" and 0.9 < old3.lambda_max < 1 and old3.format == "silo.gate.v3"
    assert KNNConfig.model_validate({"temperature": 0.5}).tau == 0.5 == KNNConfig.model_validate({"tau": 0.5}).tau
    assert GridConfig.model_validate({"temperature": [0.3], "temperature_scale": "absolute"}).tau == [0.3]


def test_gate_follows_the_text_not_the_settings(gated):
    lm, gate, _ = gated
    knn = lm.retriever("knn")
    stored = next(d for s in lm.store.shards for d in s.documents if d.domain == "gcide").text[2000:4000]
    python = next(d.text for d in load_documents(VAL, ["python"]))[:2000]
    res_store, res_py = lm.score([stored, python], knn)
    assert res_store.perplexity < 0.7 * res_store.perplexity_parametric  # text the store holds: large gain
    assert res_py.perplexity <= 1.02 * res_py.perplexity_parametric  # text it does not hold: the LM's level
    pos = lm.collect([stored, python])
    nb = knn.search(pos.keys)
    every = np.ones(len(pos.targets), bool)
    lam = knn.lambdas(nb, pos.lm, every, knn.recent(nb, pos, every), knn.match(nb, pos.context))
    assert lam[pos.text_index == 0].mean() > 2 * lam[pos.text_index == 1].mean()
    # generation reads the same gate: a stored passage's continuation is carried by the store and attributed
    prompt = stored[:160]
    comp = lm.complete(prompt, SamplingParams(max_new_tokens=12, temperature=0), knn)
    assert any(s.support.lmbda > 0.3 for s in comp.steps if s.token >= 0)
    assert any(src.owner == "gcide" for a in comp.attributions for src in a.sources)


def test_gate_shrinks_when_a_shard_leaves(gated):
    """No re-tuning after an opt-out: the same gate reads larger distances and lowers lambda by itself."""
    lm, gate, _ = gated
    doc = next(d for s in lm.store.shards for d in s.documents if d.domain == "shakespeare")
    text = doc.text[3000:5000]
    full = lm.retriever("knn")
    wo = without_owners(lm.store, {doc.owner})
    after = lm.retriever("knn", store=wo)
    assert after.mixture is full.mixture or after.mixture.k == full.mixture.k
    pos = lm.collect([text])
    every = np.ones(len(pos.targets), bool)
    lams = []
    for r in (full, after):
        nb = r.search(pos.keys)
        lams.append(r.lambdas(nb, pos.lm, every, r.recent(nb, pos, every), r.match(nb, pos.context)).mean())
    assert lams[1] < 0.6 * lams[0], lams
    p_before, p_after, p_lm = ppl(full.mix_targets(pos)), ppl(after.mix_targets(pos)), ppl(pos.logp_lm)
    assert p_before < p_lm and p_after <= 1.05 * p_lm, (p_before, p_after, p_lm)


def test_lambda_floor_is_fitted_within_tolerance_and_used_everywhere(gated, tmp_path):
    """Below the fitted floor the store is not used: not in scoring, not in greedy generation."""
    import dataclasses
    import shutil

    lm, gate, report = gated
    fl = report["min_lambda"]
    assert gate.min_lambda == fl["chosen"] and Gate.load(lm.store).min_lambda == gate.min_lambda
    kept = [row for row in fl["curve"] if row["min_lambda"] <= gate.min_lambda]
    assert kept and all(row["worst_relative"] <= 1 + fl["tolerance"] for row in kept)
    if len(fl["curve"]) > len(kept):  # the first floor past the chosen one broke the tolerance somewhere
        assert fl["curve"][len(kept)]["worst_relative"] > 1 + fl["tolerance"]
    text = next(d.text for d in load_documents(VAL, ["shakespeare"]))[:1500]
    pos = lm.collect([text])
    every = np.ones(len(pos.targets), bool)
    r = lm.retriever("knn", skip="off")
    nb = r.search(pos.keys)
    recent, match = r.recent(nb, pos, every), r.match(nb, pos.context)
    raw = dataclasses.replace(gate, min_lambda=0.0).lambdas(nb, lm.store, pos.lm, recent, match)
    high = dataclasses.replace(gate, min_lambda=float(np.median(raw[raw > 0])))
    lam = high.lambdas(nb, lm.store, pos.lm, recent, match)
    assert np.array_equal(lam, np.where(raw >= high.min_lambda, raw, 0.0)) and (lam == 0).any() and (lam > 0).any()
    # a floor above every lambda: the served mixture is the LM alone, in scoring and in generation
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    dataclasses.replace(gate, min_lambda=1.01).save(store)
    original = lm.swap_store(Datastore.open(store))
    try:
        off = lm.retriever("knn", skip="off")
        assert off.mixture.kind == "gated" and off.mixture.min_lambda == 1.01
        res = lm.score([text], off)[0]
        assert np.allclose(res.logp, res.logp_parametric)
        g = SamplingParams(max_new_tokens=12, temperature=0)
        assert lm.complete(text[:120], g, off).tokens == lm.complete(text[:120], g, None).tokens
    finally:
        lm.swap_store(original)


def test_greedy_decoding_follows_the_more_probable_source(gated):
    """Greedy gated generation takes the LM's choice where lambda < 1/2 and the mixture's elsewhere: text
    the store does not hold comes out as parametric-only; a stored passage is still carried by the store."""
    lm, _, _ = gated
    knn, g = lm.retriever("knn", skip="off"), SamplingParams(max_new_tokens=16, temperature=0)
    python = next(d.text for d in load_documents(VAL, ["python"]))
    stored = next(d for s in lm.store.shards for d in s.documents if d.domain == "gcide").text[2000:2160]
    seen_lm_source = False
    for start in range(0, 1200, 200):
        prompt = python[start:start + 120]
        comp = lm.complete(prompt, g, knn)
        lams = [s.support.lmbda for s in comp.steps if s.token >= 0]
        if max(lams) < 0.5:
            seen_lm_source |= max(lams) > 0  # the store was mixed in, and greedy still took the LM's choice
            assert comp.tokens == lm.complete(prompt, g, None).tokens
    assert seen_lm_source
    comp = lm.complete(stored, g, knn)
    assert any(s.support.lmbda >= 0.5 for s in comp.steps if s.token >= 0)
    assert comp.tokens != lm.complete(stored, g, None).tokens
    # a fixed lambda is used as given, even below 1/2
    fixed = lm.retriever("knn", k=16, lmbda=0.3, tau=1.0)
    assert fixed.greedy(None, "mixture", None) == "mixture"


def test_generated_log_probs_are_the_gated_mixture_that_scoring_gives(gated):
    """With skipping off and a prompt within the warm-up (64 tokens), a generation's token log-probs (the log
    of the gate's mixture at each step) are what scoring the prompt and completion gives, within 1e-4; the
    lambdas too. (Skipping, or a longer prompt, starts the gate's recent-gain state differently: README.)"""
    from silo.model.request import GenerationRequest, OutputControls, RetrievalParams

    lm, _, _ = gated
    stored = next(d for s in lm.store.shards for d in s.documents if d.domain == "gcide").text[2000:2100]
    for prompt in (stored, "def main():\n    return"):
        params = RetrievalParams(mode="knn", skip="off")
        comp = lm.run(GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=20, temperature=1.0,
                                                                               seed=1),
                                        retrieval=params, output=OutputControls(logprobs=2, echo=True)))
        ids = lm.text_ids(prompt)
        assert len(ids) <= 65
        rescored = lm.score_ids([ids + [t.token for t in comp.logprobs]], lm.retriever_for(params))[0]
        n = len(ids) - 1
        got = np.array([t.logprob for t in comp.logprobs])
        assert np.abs(got - rescored.logp[n:]).max() < 1e-4
        assert np.abs(np.array([t.lmbda for t in comp.logprobs]) - rescored.lmbda[n:]).max() < 1e-4
        assert np.abs(np.array([t.logprob for t in comp.prompt_logprobs]) - rescored.logp[:n]).max() < 1e-6
        if prompt == stored:  # the store's own text: the comparison covers steps where the store counts (text
            assert max(t.lmbda for t in comp.logprobs) > 0.5  # the store does not hold may rightly get lambda 0)


def test_joint_prefill_searches_all_prompts_at_once_with_the_same_states(gated, monkeypatch):
    """begin_many: the recent-gain warm-up of sequences joining together from one search of all their
    prompt positions, equal to each prompt's own `begin`; and their greedy text equals each alone."""
    from silo.model.batch import BatchDecoder, Decoding
    from silo.model.sampling import SamplingParams

    lm = gated[0]
    knn = lm.retriever("knn")
    assert knn.mixture.needs_history
    prompts = ["To be, or not to be, that is the question", "def main():\n    return", "Abandon, v. t. To give up"]
    ids = [[lm.tokenizer.eos_token_id] + lm.encode(p) for p in prompts]
    runs = [lm.forward(torch.tensor([i], device=lm.device)) for i in ids]
    args = ([h[0].cpu().numpy() for h, _, _ in runs], [torch.log_softmax(g[0].double(), -1) for _, g, _ in runs], ids)
    alone = [knn.begin(h, g, i) for h, g, i in zip(*args)]
    searches = []
    real = lm.store.search
    monkeypatch.setattr(lm.store, "search", lambda q, k: searches.append(len(q)) or real(q, k))
    together = knn.begin_many(*args)
    assert searches == [sum(len(i) - 1 for i in ids)]
    assert together == alone and all(s.weight > 0 for s in together)
    want = [lm.complete(p, SamplingParams(max_new_tokens=8, temperature=0), knn, attribute=False).tokens for p in prompts]
    dec = BatchDecoder(lm)
    seqs = dec.add_many([Decoding(i, SamplingParams(max_new_tokens=8, temperature=0), knn) for i in ids])
    while dec.active:
        dec.step()
    assert [s.completion.tokens for s in seqs] == want


def test_empty_store_answers_with_the_lm_alone(gated):
    lm, _, _ = gated
    empty = Datastore(lm.store.path, lm.store.manifest, [], lm.store.device)
    text = "In the beginning God created the heaven and the earth."
    for r in (lm.retriever("knn", store=empty), lm.retriever("knn", store=empty, mixture="fixed")):
        res = lm.score([text], r)[0]
        assert np.allclose(res.logp, res.logp_parametric)
        comp = lm.complete("In the beginning", SamplingParams(max_new_tokens=5, temperature=0), r)
        par = lm.complete("In the beginning", SamplingParams(max_new_tokens=5, temperature=0), None)
        assert comp.tokens == par.tokens


def test_decontamination_finds_a_planted_overlap(tiny_store, tmp_path, tiny_model):
    store = Datastore.open(tiny_store)
    stored = store.shards[0].documents[0].text
    clean = load_documents(VAL, ["python"])[:2]
    planted = Document(id="val/planted", text="Some introduction of our own. " + stored[500:900] + " And an end.",
                       owner="x", domain="python")
    index = OverlapIndex(store)
    found = find_overlaps(clean + [planted], index)
    planted_found = [o for o in found if o.document_id == "val/planted"]
    assert planted_found and planted_found[0].shared > 10 and planted_found[0].near_copy
    assert all(not o.near_copy for o in found if o.document_id != "val/planted")
    kept, overlaps = decontaminate(clean + [planted], store)
    assert [d.id for d in kept] == [d.id for d in clean] and len(overlaps) == 1
    # silo eval reports it and leaves it out unless told to keep it
    write_jsonl(clean + [planted], tmp_path / "heldout.jsonl")
    cfg = {"eval": {"model": str(tiny_model), "store": str(tiny_store), "val": [str(tmp_path / "heldout.jsonl")],
                    "test": [str(tmp_path / "heldout.jsonl")], "max_tokens": 300, "window": 128, "stride": 64,
                    "output_dir": str(tmp_path / "eval"), "gate": "off",
                    "grid": {"k": [4, 16], "lmbda": [0.0, 0.5], "tau": [1.0]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from silo.cli import main

    assert main(["eval", "--config", str(tmp_path / "c.yaml")]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {(o["document_id"], o["split"], o["kept"]) for o in res["overlaps"] if o["near_copy"]} == \
        {("val/planted", "val", False), ("val/planted", "test", False)}
    assert all(o["kept"] for o in res["overlaps"] if not o["near_copy"])
    assert "near-copies of store text (left out): val/planted" in (tmp_path / "eval" / "results.md").read_text()


def test_boundary_choices_are_reported(tiny_model, tiny_store, tmp_path):
    """k chosen at the largest value tried is named in the table, not silently used."""
    from silo.workflows.evaluate import EvalConfig, evaluate

    stored = [d for d in load_documents(str(tiny_store.parent.parent / "corpus0" / "datastore.jsonl"))]
    write_jsonl(stored, tmp_path / "stored.jsonl")
    cfg = EvalConfig(model=str(tiny_model), store=str(tiny_store), val=[str(tmp_path / "stored.jsonl")],
                     test=[str(tmp_path / "stored.jsonl")], keep_overlap=True, max_tokens=400, window=128, stride=64,
                     gate="off", output_dir=str(tmp_path / "eval"),
                     grid={"k": [1, 2], "lmbda": [0.0, 0.5], "tau": [1.0]})
    out = evaluate(cfg, progress=False)
    warnings = [w for r in out.domains for w in r.warnings]
    assert any("k 2 is the largest value tried" in w for w in warnings), warnings
    assert "warning: " in (tmp_path / "eval" / "results.md").read_text()


def test_server_serves_the_gate_by_default(gated, tiny_model):
    from silo.serving.client import SiloClient
    from silo.serving.config import ServeConfig
    from silo.serving.server import SiloServer

    lm, gate, _ = gated
    server = SiloServer(ServeConfig(model=str(tiny_model), store=str(lm.store.path), port=0), lm=lm).start()
    try:
        with SiloClient(server.target, timeout=60) as c:
            info = c.info()
            assert info.knn.mixture == "gated" and info.knn.k == gate.k
            text = next(d.text for d in load_documents(VAL, ["python"]))[:1500]
            served, par = c.score(text), c.score(text, mode="parametric")
            assert served.perplexity <= 1.02 * par.perplexity
            fixed = c.score(text, lmbda=0.8, tau=0.5, k=16)  # explicit settings: the fixed mixture
            assert fixed.perplexity != served.perplexity
    finally:
        server.stop()
