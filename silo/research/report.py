"""`silo report`: every experiment of the harness into one folder of tables (md/JSON/CSV) and PNG plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.workflows.evaluate import EvalConfig, cached_collect, domain_texts, evaluate

from .config import ResearchConfig
from .experiments import ensure_blocks, owner_effect, scaling, sweep, variant_rows
from .modes import bytes_rows, infgram_rows
from .plots import plot_bytes, plot_domains, plot_gate, plot_lambda, plot_scaling, plot_skip
from .tables import main_rows, write_table


def gate_points(ev: EvalConfig, lm: SiloLM, cache: dict) -> dict:
    """Per test domain: the nearest distance and the gate's lambda of every scored position."""
    from silo.core.corpus import load_documents

    knn = lm.retriever("knn", skip="off")
    out = {}
    for dom, texts in domain_texts(load_documents(ev.test, ev.domains), ev.max_tokens).items():
        pos = cached_collect(lm, texts, ev.max_tokens, cache, ("test", dom))
        nb = knn.search(pos.keys)
        every = np.ones(len(pos.targets), bool)
        lam = knn.lambdas(nb, pos.lm, every, knn.recent(nb, pos, every), knn.match(nb, pos.context))
        out[dom] = (nb.distances[:, 0].astype(float), lam)
    return out


def report(ev: EvalConfig, rc: ResearchConfig, progress: bool = True) -> dict:
    """Everything into rc.output_dir: results/sweep/scaling/opt-out/variants tables, PNG plots, report.md."""
    t0 = time.time()
    out = Path(rc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = SiloLM.load(ev.model, None, knn=ev.knn, window=ev.window, stride=ev.stride)
    if ev.ric.enabled is not False:
        ensure_blocks(ev.store, lm.tokenizer, rc, progress)
    lm.swap_store(Datastore.open(ev.store, fingerprint=lm.fingerprint))
    ref = SiloLM.load(ev.reference_model, window=ev.window, stride=ev.stride) if ev.reference_model else None
    cache: dict = {}
    steps = tqdm(total=7, desc="report", unit="step", disable=not progress or None)

    res = evaluate(ev, progress=progress, lm=lm, ref=ref, cache=cache, write=False)
    knn_sweeps = res.sweeps
    steps.update()
    inf = infgram_rows(ev, lm, cache)
    steps.update()
    sw = sweep(ev, rc, lm, cache, progress, knn_sweeps=knn_sweeps if not rc.sweep.max_tokens else None)
    steps.update()
    sc = scaling(ev, rc, lm, ref, cache, progress, full=res) if rc.scaling.enabled else None
    steps.update()
    oo = owner_effect(ev, rc, lm, cache, progress, full=res) if rc.owner_effect.enabled else None
    steps.update()
    va = variant_rows(ev, rc, lm, cache, progress) if rc.variants else {"variants": {}, "skipped": []}
    steps.update()

    md = [_header(ev, res)]
    rows = main_rows(res, va, inf)
    md.append(write_table(out, "results", rows, "Test perplexity per domain (kNN-LM tuned on validation)"))
    md.append(_infgram_lines(inf))
    (out / "results_full.json").write_text(json.dumps(res.to_json(), indent=1))
    (out / "infgram_rows.json").write_text(json.dumps(inf, indent=1))
    md += _sweep_tables(out, sw)
    plots = _plots(ev, rc, lm, cache, out, sw, rows)
    by = _bytes_section(out, rc, lm.store, rows, plots)
    md.append(by["md"])
    if sc is not None:
        md.append(_scaling_table(out, rc, sc, plots))
    if oo is not None:
        flat = [{k: (v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in r.items()} for r in oo["rows"]]
        md.append(write_table(out, "optout", flat, "Opt-out: an owner's held-out text with and without their shards"))
    if va["skipped"]:
        md.append("Variants not trained (rows left out): " + "; ".join(f"{s['name']} ({s['why']})" for s in va["skipped"]) + "\n")
    (out / "variants.json").write_text(json.dumps(va, indent=1))
    md.append("## Plots\n\n" + "".join(f"![{k}]({k}) {v}\n\n" for k, v in plots.items()))
    md.append(f"_{time.time() - t0:.0f}s_\n")
    (out / "report.md").write_text("\n".join(md))
    steps.update()
    steps.close()
    return {"output_dir": str(out), "results": res, "rows": rows, "infgram": inf, "bytes": by["rows"], "sweep": sw, "scaling": sc, "owner_effect": oo,
            "variants": va, "plots": sorted(plots), "seconds": round(time.time() - t0, 1)}


def _header(ev: EvalConfig, res) -> str:
    """The report's first paragraph: what was evaluated, and how."""
    head = (f"# SILO research report\n\nmodel `{ev.model}`, store `{ev.store}` ({res.store_entries:,} entries), "
            f"reference `{ev.reference_model}`; up to {ev.max_tokens} scored test tokens per domain; "
            f"windows {res.window}/{res.stride}")
    if res.ric is not None:
        r = res.ric
        head += (f"; RIC-LM windows {r['window']}/{r['stride']} with {r['n_blocks']} block(s) of "
                 f"{r['block_tokens']} tokens ({r['blocks']:,} blocks)")
    return head + ".\n"


def _sweep_tables(out: Path, sw: dict) -> list[str]:
    """The sweep's tables (best settings, RIC block counts, λ sensitivity) and sweep.json; returns the
    markdown of those the report shows."""
    md = []
    best_rows = []
    for dom, b in sw["best"].items():
        row = {"domain": dom, "k": b["knn"]["k"], "λ": b["knn"]["lmbda"], "τ": b["knn"]["tau"],
               "val kNN-LM": b["knn"]["val_ppl"]}
        for name, rb in b.get("ric", {}).items():
            row[f"RIC ({name}) blocks"] = f"{rb['n_blocks']}{' ens' if rb['ensemble'] else ''}"
            row[f"val RIC ({name})"] = rb["val_ppl"]
        best_rows.append(row)
    md.append(write_table(out, "sweep_best", best_rows, "Best settings on validation"))
    ric_rows = [{"domain": d, **r} for d, rs in sw["ric"].items() for r in rs]
    if ric_rows:
        md.append(write_table(out, "sweep_ric", ric_rows, "RIC-LM block count on validation"))
    lam_rows = [{"domain": d, **p} for d, pts in sw["lambda_curves"].items() for p in pts]
    write_table(out, "sweep_lambda", lam_rows, "λ sensitivity (best k, τ per λ; validation)")
    (out / "sweep.json").write_text(json.dumps(sw, indent=1))
    return md


def _plots(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM, cache: dict, out: Path, sw: dict,
           rows: list[dict]) -> dict[str, str]:
    """The λ, per-domain and gate plots (when rc.plots); returns {file: caption}."""
    plots = {}
    if not rc.plots:
        return plots
    if any(sw["lambda_curves"].values()):
        plot_lambda(sw["lambda_curves"], out / "lambda_sensitivity.png")
        plots["lambda_sensitivity.png"] = "validation perplexity (relative to λ=0) against λ, per domain"
    if rows:
        plot_domains(rows, out / "perplexity_by_domain.png")
        plots["perplexity_by_domain.png"] = "test perplexity per domain and method"
    gate = lm.gate()
    if gate is not None:
        plot_gate(gate_points(ev, lm, cache), gate.tau_ref, out / "gate_lambda.png")
        plots["gate_lambda.png"] = "the gate's λ per test token against the nearest neighbour's distance"
        if gate.skip is not None and gate.skip.curve:
            plot_skip(gate.skip.curve, out / "skip_curve.png")
            plots["skip_curve.png"] = "retrieval skipping: validation perplexity against the share of searches skipped"
    return plots


def _infgram_lines(inf: dict) -> str:
    """Under the results: the inf-gram gates served, and why an inf-gram mode has no column."""
    lines = [f"inf-gram column {m!r}: served gate over the {g['base']} ({g['mode']}"
             + (f": {g['fallback']}" if g.get("fallback") else "") + ")" for m, g in inf["gates"].items()]
    by_reason: dict[str, list[str]] = {}
    for m, why in inf["absent"].items():
        by_reason.setdefault(why, []).append(m)
    lines += [f"no inf-gram rows ({', '.join(ms)}): {why}" for why, ms in by_reason.items()]
    return "".join(f"{line}\n\n" for line in lines)


def _bytes_section(out: Path, rc: ResearchConfig, store: Datastore, rows: list[dict], plots: dict[str, str]) -> dict:
    """The bytes-per-token table (bytes.md/json/csv) and (with rc.plots) its plot, added to `plots`."""
    brows, notes = bytes_rows(store, rows)
    md = write_table(out, "bytes", brows, "Datastore bytes per stored token on disk against test perplexity "
                                          "(mean over the store's domains)")
    md += "".join(f"\n{n}\n" for n in notes)
    if rc.plots and any(r["mean perplexity"] is not None for r in brows if r["mode"] != "parametric"):
        plot_bytes(brows, out / "perplexity_vs_bytes.png")
        plots["perplexity_vs_bytes.png"] = ("test perplexity (mean over the store's domains) against datastore bytes "
                                            "per stored token, per mode")
    return {"md": md, "rows": brows, "notes": notes}


def _scaling_table(out: Path, rc: ResearchConfig, sc: dict, plots: dict[str, str]) -> str:
    """The scaling table, scaling_rows.json and (with rc.plots) its plot, added to `plots`."""
    flat = [{"fraction": r["fraction"], "entries": r["entries"], "documents": r["documents"], "domain": dom, **{
        k: v for k, v in vals.items() if k != "knn_settings"}} for r in sc["rows"] for dom, vals in r["domains"].items()]
    md = write_table(out, "scaling", flat, "Datastore scaling (test perplexity)")
    (out / "scaling_rows.json").write_text(json.dumps(sc, indent=1))
    if rc.plots and sc["rows"]:
        plot_scaling(sc, out / "scaling.png")
        plots["scaling.png"] = "test perplexity against the share of the datastore"
    return md
