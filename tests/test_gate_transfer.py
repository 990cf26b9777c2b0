"""The gate on a store it was not made for: a second store built from the shipped manuals corpus
(pkg:manuals: a puzzle collection's manual and the SQLite documentation, text of a kind the demo corpus
lacks), and planted pathological cases: every validation document a near-copy of the store, validation
from one domain only, distances 100x larger. The fit must never save a mixture worse than the LM alone."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import yaml

from silo.core.corpus import Document, load_documents, write_jsonl
from silo.datastore.store import Datastore
from silo.model.gate import Gate
from silo.model.lm import SiloLM
from silo.research.snapshots import without_owners
from silo.workflows.gate_check import judge, served_rows
from silo.workflows.gate_fit import GateConfig, GateFitError, fit_gate, fit_store_gate

FIT = dict(max_tokens=600, k=[4, 16, 64], window=128, stride=64, lm_samples=1000)
NOT_HELD = "pkg:demo/val"  # Python documentation: text the manuals store does not hold


def ppl(x) -> float:
    return math.exp(-float(np.mean(x)))


def build_store(model, out, corpus, **over):
    from silo.core.config import validate
    from silo.datastore.build import DatastoreConfig, build_datastore

    cfg = validate(DatastoreConfig, dict(model=str(model), corpus=[str(corpus)], output_dir=str(out), window=128,
                                         stride=96, batch_size=16, max_chars_per_shard=30000, **over))
    build_datastore(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def manuals(tmp_path_factory, tiny_model):
    """The second store (two owners, Flat) and its gate fitted on its own validation split only (text of
    the store's kind it does not hold; no other domain): the fit sees text unlike the store only in what
    the LM writes itself."""
    store = build_store(tiny_model, tmp_path_factory.mktemp("manuals") / "store", "pkg:manuals/datastore")
    cfg = GateConfig(model=str(tiny_model), store=str(store), val=["pkg:manuals/val"], **FIT)
    gate, report = fit_store_gate(cfg, progress=False)
    return SiloLM.load(str(tiny_model), str(store), window=128, stride=64), gate, report


def _texts(spec, domain, n=2, chars=2500):
    return [d.text[:chars] for d in load_documents(spec, [domain])[:n]]


def test_second_store_gate_helps_what_it_holds_and_spares_the_rest(manuals):
    lm, gate, report = manuals
    assert gate.mode == "gated" and gate.scale_source == "store" and not report["check"]["failures"]
    assert set(report["domains"]) == {"puzzles", "sqlite", "lm-samples"}
    knn = lm.retriever("knn")
    # text the store does not hold: the LM's level (the fit never saw such validation text)
    for res in lm.score(_texts(NOT_HELD, "python") + _texts(NOT_HELD, "bible"), knn):
        assert res.perplexity <= 1.02 * res.perplexity_parametric
    # text of the store's kind it does not hold (the test split): most of the tuned fixed lambda's gain
    pos = lm.collect(_texts("pkg:manuals/test", "puzzles") + _texts("pkg:manuals/test", "sqlite"))
    fixed = lm.retriever("knn", k=report["fixed"]["k"], lmbda=report["fixed"]["lmbda"], tau=report["fixed"]["tau"])
    gain_fixed = np.mean(fixed.mix_targets(pos)) - np.mean(pos.logp_lm)
    gain_gated = np.mean(knn.mix_targets(pos)) - np.mean(pos.logp_lm)
    assert gain_fixed > 0 and gain_gated >= 0.8 * gain_fixed, (gain_gated, gain_fixed)
    # the puzzles' owner opts out: no re-fit, the same gate, and their text is back at the LM's level
    after = lm.retriever("knn", store=without_owners(lm.store, {"sgt-puzzles"}))
    assert after.mixture.k == gate.k
    out = lm.collect(_texts("pkg:manuals/test", "puzzles"))
    assert ppl(after.mix_targets(out)) <= 1.05 * ppl(out.logp_lm)


def test_validation_that_is_all_near_copies_is_an_error_and_nothing_is_saved(manuals, tiny_model, tmp_path):
    lm = manuals[0]
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    (store / "gate.json").unlink()
    held = [Document(**{**d.to_json(), "id": "val/" + d.id}) for d in load_documents("pkg:manuals/datastore")[:3]]
    write_jsonl(held, tmp_path / "copies.jsonl")
    cfg = {"gate": {"model": str(tiny_model), "store": str(store), "val": [str(tmp_path / "copies.jsonl")], **FIT}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    from silo.cli import main

    assert main(["datastore", "fit-gate", "--config", str(tmp_path / "c.yaml")]) == 2
    assert not (store / "gate.json").exists()


def test_in_store_validation_decontaminated_fits_on_the_rest_and_says_so(manuals, tiny_model, tmp_path, capsys):
    """The issue's case: every validation document of the store's kind is left out; the gate is fitted on
    what remains, loudly, and is no worse than the LM on any validation domain."""
    lm = manuals[0]
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    stored = [d for s in lm.store.shards for d in s.documents if d.domain == "puzzles"][:3]
    docs = [Document(id="val/" + d.id, text=d.text, owner=d.owner, domain="puzzles") for d in stored]
    write_jsonl(docs + load_documents(NOT_HELD, ["python"])[:3], tmp_path / "val.jsonl")
    cfg = GateConfig(model=str(tiny_model), store=str(store), val=[str(tmp_path / "val.jsonl")], **FIT)
    gate, report = fit_store_gate(cfg)
    said = capsys.readouterr().out
    assert "DOMAIN 'puzzles' HAS NO DOCUMENTS LEFT" in said and "fitted without it" in said
    assert set(report["domains"]) == {"python", "lm-samples"}
    for dom, row in report["domains"].items():
        assert math.isfinite(row["gated"]) and row["gated"] <= row["parametric"] * 1.03, (dom, row)
    assert Gate.load(store).mode == gate.mode


def test_validation_from_one_domain_only(manuals, tiny_model, tmp_path):
    lm = manuals[0]
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    cfg = GateConfig(model=str(tiny_model), store=str(store), val=["pkg:manuals/val"], domains=["sqlite"], **FIT)
    gate, report = fit_store_gate(cfg, progress=False)
    assert not report["check"]["failures"] or gate.mode != "gated"
    lm2 = SiloLM.load(str(tiny_model), str(store), window=128, stride=64)
    for res in lm2.score(_texts(NOT_HELD, "python"), lm2.retriever("knn")):
        assert res.perplexity <= 1.02 * res.perplexity_parametric
    assert all(np.isfinite(gate.weights)) and abs(gate.tau_slope) <= 2 and abs(gate.match_bonus) <= 2


def test_distances_100x_larger_give_the_same_gate(manuals, tiny_model, tmp_path):
    """A model whose keys are 10x larger (final norm x10, output layer /10: the same next-token
    distributions) gives a store with 100x the distances; the gate's unit follows the store, so the fit
    and the served perplexities are the same."""
    from transformers import AutoModelForCausalLM

    lm, gate, report = manuals
    big = tmp_path / "model"
    shutil.copytree(tiny_model, big)
    model = AutoModelForCausalLM.from_pretrained(str(big))
    final = model.gpt_neox.final_layer_norm
    final.weight.data *= 10
    final.bias.data *= 10
    model.get_output_embeddings().weight.data /= 10
    model.save_pretrained(str(big))
    store = build_store(big, tmp_path / "store", "pkg:manuals/datastore")
    g100, r100 = fit_store_gate(GateConfig(model=str(big), store=str(store), val=["pkg:manuals/val"], **FIT),
                                progress=False)
    assert 80 < g100.tau_ref / gate.tau_ref < 125
    for dom in ("puzzles", "sqlite"):
        a, b = report["domains"][dom], r100["domains"][dom]
        assert abs(b["parametric"] / a["parametric"] - 1) < 0.01
        assert abs(b["gated"] / a["gated"] - 1) < 0.03, (dom, a, b)


def test_a_gate_worse_than_the_lm_is_never_saved(manuals):
    """The final check, on a real fit whose gate is then made to trust the store everywhere (lambda at its
    bound): it fails, naming the domains and numbers; without fallback nothing is returned to save, with
    fallback a named fixed or parametric mixture is, and that passes every domain."""
    lm, _, _ = manuals
    val = load_documents("pkg:manuals/val") + load_documents(NOT_HELD, ["python"])[:2]
    from silo.workflows.gate_data import validation_positions

    pos, labels = validation_positions(lm, val, 600)
    labels = np.asarray(labels)
    nb = lm.store.search(pos.keys, 64)
    gate, report = fit_gate(lm.store, nb, pos, [16, 64], bos=lm.tokenizer.eos_token_id, labels=labels,
                            tau_ref=manuals[1].tau_ref)
    reckless = dataclasses.replace(gate, weights=[0.0] * len(gate.weights), bias=60.0, min_lambda=0.0)
    with pytest.raises(GateFitError, match=r"python \(served\): gated [\d.]+ > parametric [\d.]+"):
        judge(reckless, dict(report, held_out=dict(report["held_out"]), warnings=[]), lm, nb, pos, labels, 0.01,
              fallback=False)
    weaker = judge(reckless, dict(report, warnings=[]), lm, nb, pos, labels, 0.01, fallback=True)
    assert weaker.mode in ("fixed", "parametric") and "final check" in weaker.fallback
    for dom, row in served_rows(lm, weaker, nb, pos, labels).items():
        assert row["gated"] <= row["parametric"] * 1.01, (dom, row)
    assert weaker.describe()["mode"] == weaker.mode
    # a fit that meets a non-finite value saves nothing: it is an error, not a warning
    broken = dataclasses.replace(nb, distances=np.where(np.arange(nb.distances.shape[1]) == 3, np.nan, nb.distances))
    with pytest.raises((GateFitError, FloatingPointError)), np.errstate(over="raise", invalid="raise", divide="raise"):
        fit_gate(lm.store, broken, pos, [16], bos=lm.tokenizer.eos_token_id, labels=labels, tau_ref=gate.tau_ref)


def test_a_fallback_is_named_by_info_and_eval(manuals, tiny_model, tmp_path, capsys):
    from silo.cli import main
    from silo.workflows.evaluate import EvalConfig, evaluate

    lm, gate, _ = manuals
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    dataclasses.replace(gate, mode="fixed", fixed_lambda=0.1, fallback="the fitted gate failed its final check: "
                        "python (served): gated 250.00 > parametric 200.00").save(store)
    assert main(["datastore", "info", str(store)]) == 0
    info = json.loads(capsys.readouterr().out)["gate"]
    assert info["SERVES"].startswith("the fixed mixture (fallback)") and "python (served)" in info["fallback"]
    out = evaluate(EvalConfig(model=str(tiny_model), store=str(store), val=[NOT_HELD], test=[NOT_HELD],
                              domains=["python"], max_tokens=200, window=128, stride=64, gate="store", tune=False,
                              output_dir=str(tmp_path / "eval")), progress=False)
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "served (fixed fallback)" in table and "serves a fallback (fixed)" in table
    assert out.domains[0].gated_lambda is not None


def test_every_domain_given_to_eval_has_a_row(manuals, tiny_model, tmp_path):
    """A domain whose test documents were all left out as near-copies, one without validation text, one
    with nothing at all: each has its row in the table, with the reason; none disappears."""
    from silo.workflows.evaluate import EvalConfig, evaluate

    lm = manuals[0]
    stored = [d for s in lm.store.shards for d in s.documents if d.domain == "puzzles"][:2]
    copies = [Document(id="test/" + d.id, text=d.text, owner=d.owner, domain="puzzles") for d in stored]
    write_jsonl(copies + load_documents("pkg:manuals/test", ["sqlite"])[:1] + load_documents(NOT_HELD, ["python"])[:1],
                tmp_path / "test.jsonl")
    write_jsonl(load_documents("pkg:manuals/val", ["puzzles"]) + load_documents(NOT_HELD, ["python"])[1:2],
                tmp_path / "val.jsonl")
    cfg = EvalConfig(model=str(tiny_model), store=str(lm.store.path), val=[str(tmp_path / "val.jsonl")],
                     test=[str(tmp_path / "test.jsonl")], domains=["python", "puzzles", "sqlite", "gcide"],
                     max_tokens=300, window=128, stride=64, gate="store", output_dir=str(tmp_path / "eval"),
                     grid={"k": [4, 16], "lmbda": [0.0, 0.5], "tau": [1.0]})
    out = evaluate(cfg, progress=False)
    rows = {r.domain: r for r in out.domains}
    assert list(rows) == ["python", "puzzles", "sqlite", "gcide"]
    assert rows["python"].knn is not None and rows["python"].knn_gated is not None and not rows["python"].reason
    assert rows["puzzles"].parametric is None and "near-copies" in rows["puzzles"].reason
    assert rows["gcide"].parametric is None and "no test documents given" in rows["gcide"].reason
    assert rows["sqlite"].knn is None and rows["sqlite"].knn_gated is not None and "not tuned" in rows["sqlite"].reason
    table = (tmp_path / "eval" / "results.md").read_text()
    for dom in rows:
        assert f"| {dom} |" in table
    assert "near-copies" in table and "no test documents given" in table
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [d["domain"] for d in saved["domains"]] == list(rows)


def test_decontamination_keeps_documents_that_share_stock_phrases(manuals):
    from silo.workflows.decontam import OverlapIndex, decontaminate

    lm = manuals[0]
    stored = next(d for s in lm.store.shards for d in s.documents if d.domain == "sqlite").text
    own = " ".join(load_documents(NOT_HELD, ["python"])[0].text.split()[:600])
    phrase = " ".join(stored.split()[100:120])  # one stock phrase of 20 words: 8 of ~600 13-grams
    few = Document(id="val/few", text=own[:1500] + " " + phrase + " " + own[1500:], owner="x", domain="python")
    copy = Document(id="val/copy", text="Our notes. " + stored[:3000], owner="x", domain="python")
    kept, overlaps = decontaminate([few, copy], lm.store, index=OverlapIndex(lm.store))
    assert [d.id for d in kept] == ["val/few"]
    by = {o.document_id: o for o in overlaps}
    assert not by["val/few"].near_copy and 0 < by["val/few"].fraction < 0.05
    assert by["val/copy"].near_copy and by["val/copy"].fraction > 0.9



def test_the_broken_gate_of_the_issue_scores_finitely(manuals, tmp_path):
    """The gate the issue found saved (tau at the edge of its range, tau_slope 579, match_bonus -54.6, as a
    v3 file): read today it scores without overflow, division by zero or an infinite perplexity, and
    keeps p_LM in every token's mixture."""
    lm, gate, _ = manuals
    old = {k: v for k, v in gate.to_json().items()
           if k not in ("lambda_max", "mode", "fixed_lambda", "fallback", "scale_source")}
    old.update(format="silo.gate.v3", tau=gate.tau_ref * 3e-4, tau_slope=579.0, match_bonus=-54.6, skip=None)
    store = tmp_path / "store"
    shutil.copytree(lm.store.path, store)
    (store / "gate.json").write_text(json.dumps(old))
    knn = lm.retriever("knn", store=Datastore.open(store))
    assert knn.mixture.tau_slope == 579.0 and knn.mixture.lambda_max < 1
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        res = lm.score(_texts("pkg:manuals/test", "sqlite", n=1) + _texts(NOT_HELD, "python", n=1), knn)
    for r in res:
        assert np.isfinite(r.logp).all() and math.isfinite(r.perplexity)
        assert (r.logp >= np.log1p(-knn.mixture.lambda_max) + r.logp_parametric - 1e-9).all()
