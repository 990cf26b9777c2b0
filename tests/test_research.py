"""The research harness on the tiny model: eval with RIC-LM rows, snapshots, opt-out, the report command."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from silo.datastore.format import Manifest
from silo.datastore.store import Datastore

FRACTIONS = [0.25, 0.5, 1.0]


@pytest.fixture(scope="module")
def research_setup(tmp_path_factory, tiny_model, tiny_store):
    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks

    root = tmp_path_factory.mktemp("research")
    store = root / "store"
    shutil.copytree(tiny_store, store)  # the fixture store is shared: blocks go into a private copy
    build_blocks(store, AutoTokenizer.from_pretrained(tiny_model), 32, 16, ("bm25", "dense"), progress=False)
    cfg = {
        "eval": {"model": str(tiny_model), "store": str(store), "reference_model": str(tiny_model),
                 "val": ["pkg:demo/val"], "test": ["pkg:demo/test"], "domains": ["shakespeare", "gcide"],
                 "max_tokens": 120, "output_dir": str(root / "eval"),
                 "grid": {"k": [4, 8], "lmbda": [0.0, 0.3, 0.6], "tau": [1.0]},
                 "ric": {"retrievers": ["bm25", "dense"]}},
        "research": {"output_dir": str(root / "report"), "sweep": {"ric_blocks": [1, 2], "ric_ensemble": [False, True]},
                     "scaling": {"fractions": FRACTIONS, "ric_retrievers": ["bm25"]},
                     "variants": [{"name": "PD", "model": str(root / "no-such-model")},
                                  {"name": "same", "model": str(tiny_model)}]},
    }
    path = root / "research.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, store


def test_eval_gains_ric_rows(research_setup):
    from silo.workflows.evaluate import evaluate, markdown_table
    from silo.research import load_research

    path, _ = research_setup
    ev, _ = load_research(path)
    out = evaluate(ev, progress=False)
    for row in out.domains:
        assert None not in (row.parametric, row.knn, row.reference, row.knn_settings)  # the existing fields stay
        assert set(row.ric) == {"bm25", "dense"} and row.ric_parametric > 0
    assert out.ric["window"] + out.ric["block_tokens"] <= 128
    md = markdown_table(out)
    assert "RIC-LM (bm25)" in md and "RIC-LM (dense)" in md and "kNN-LM" in md
    saved = json.loads((ev.output_dir and open(f"{ev.output_dir}/results.json").read()))
    assert "_sweeps" not in saved and saved["domains"][0]["ric"]


def test_subsample_is_nested_deterministic_and_in_memory(research_setup):
    from silo.research import subsample, without_owners

    _, store_path = research_setup
    before = (store_path / "manifest.json").read_bytes()
    store = Datastore.open(store_path)
    kept = {}
    for f in (0.25, 0.5, 1.0):
        snap = subsample(store, f, seed=0)
        kept[f] = {(s.name, d) for s in snap.shards for d in range(len(s.documents)) if d not in s.removed_docs}
        assert snap.num_entries <= store.num_entries
        if f < 1:  # entries of dropped documents are gone from the searchable sub-index
            for s in snap.shards:
                assert not set(map(int, s.entries["doc"])) & set(s.removed_docs)
    assert kept[0.25] <= kept[0.5] <= kept[1.0]
    assert kept[0.25] == {(s.name, d) for s in subsample(store, 0.25, seed=0).shards
                          for d in range(len(s.documents)) if d not in s.removed_docs}
    owner = store.shards[0].owner
    assert all(s.owner != owner for s in without_owners(store, {owner}).shards)
    assert (store_path / "manifest.json").read_bytes() == before and Manifest.read(store_path).generation == store.generation


def test_optout_removes_the_owner_in_memory(research_setup):
    from silo.model.lm import SiloLM
    from silo.research import load_research, owner_effect

    path, _ = research_setup
    ev, rc = load_research(path)
    lm = SiloLM.load(ev.model, ev.store)
    res = owner_effect(ev, rc, lm, cache={}, progress=False)
    owners = {s.owner for s in lm.store.shards}
    assert {r["owner"] for r in res["rows"]} == owners
    for r in res["rows"]:
        assert r["tokens"] > 0 and r["entries_removed"] > 0
        assert r["ric_without_owner_blocks"] == 0 and r["ric_with_owner_blocks"] > 0
        assert r["knn_with"] != r["knn_without"]


def test_bad_research_config_names_the_field(tmp_path, research_setup):
    from silo.research import load_research
    from silo.core.config import ConfigError

    path, _ = research_setup
    data = yaml.safe_load(path.read_text())
    data["research"]["scaling"]["fractions"] = [0, 0.5]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="research.scaling.fractions"):
        load_research(bad)
    data["research"]["scaling"] = {"fractionz": [0.5]}
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="research.scaling.fractionz"):
        load_research(bad)


def test_report_command_produces_tables_and_plots(research_setup):
    from silo.cli import main

    path, store = research_setup
    cfg = yaml.safe_load(path.read_text())
    out = __import__("pathlib").Path(cfg["research"]["output_dir"])
    assert main(["report", "--config", str(path)]) == 0
    for name in ("results", "sweep_best", "sweep_ric", "sweep_lambda", "scaling", "optout"):
        for ext in ("md", "json", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for png in ("perplexity_by_domain.png", "scaling.png", "lambda_sensitivity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc = json.loads((out / "scaling_rows.json").read_text())
    assert [r["fraction"] for r in sc["rows"]] == FRACTIONS  # one row per fraction
    assert sc["rows"][0]["entries"] < sc["rows"][-1]["entries"] == Datastore.open(store).num_entries
    assert all("ric_bm25" in d for r in sc["rows"] for d in r["domains"].values())
    results = json.loads((out / "results.json").read_text())
    assert {r["domain"] for r in results} == {"shakespeare", "gcide"}
    assert all("RIC-LM (dense)" in r and "same (parametric)" in r for r in results)
    for r in results:  # the variant "same" is the evaluated model itself: identical parametric perplexity
        assert r["same (parametric)"] == pytest.approx(r["parametric"])
    report_md = (out / "report.md").read_text()
    assert "PD" in report_md and "not trained" in report_md and "scaling.png" in report_md
    # a store without inf-gram indexes: no inf-gram columns, and the report says why in one line each
    assert not any("inf-gram" in k for r in results for k in r)
    why = [line for line in report_md.splitlines() if line.startswith("no inf-gram rows")]
    assert len(why) == 1 and why[0].startswith("no inf-gram rows (infgram, knn+infgram): no inf-gram indexes")
    assert "silo datastore build-infgram" in why[0] and "silo datastore fit-infgram" in why[0]
    by = {r["mode"]: r for r in json.loads((out / "bytes.json").read_text())}
    assert set(by) == {"parametric", "kNN-LM", "RIC-LM (bm25)", "RIC-LM (dense)"}
    assert all(by[m]["bytes"] > 0 and by[m]["mean perplexity"] > 1 for m in by if m != "parametric")
    assert "inf-gram: left out: no inf-gram indexes" in report_md
    assert (out / "perplexity_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
