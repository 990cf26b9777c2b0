"""The research harness's commands: `silo sweep`, `silo scaling`, `silo opt-out-effect`, `silo report`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _configs(args):
    from silo.research import load_research

    ev_over = {"max_tokens": args.max_tokens} if getattr(args, "max_tokens", None) else {}
    over = {"output_dir": args.out} if getattr(args, "out", None) else {}
    if getattr(args, "train_variants", False):
        over["train_variants"] = True
    return load_research(args.config, ev_over, over)


def cmd_sweep(args) -> int:
    from silo.research import sweep
    from silo.research.tables import write_table

    ev, rc = _configs(args)
    res = sweep(ev, rc)
    out = Path(args.out or rc.output_dir) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(res, indent=1))
    rows = [{"domain": d, **b["knn"], **{f"RIC {r} (n, ens, val)": f"{x['n_blocks']}, {x['ensemble']}, {x['val_ppl']:.2f}"
                                          for r, x in b.get("ric", {}).items()}} for d, b in res["best"].items()]
    print(write_table(out, "sweep_best", rows, "Best settings on validation"))
    print(f"written to {out}/")
    return 0


def cmd_scaling(args) -> int:
    from silo.model.lm import SiloLM
    from silo.research import scaling
    from silo.research.tables import write_table

    ev, rc = _configs(args)
    lm = SiloLM.load(ev.model, ev.store, knn=ev.knn, window=ev.window, stride=ev.stride)
    ref = SiloLM.load(ev.reference_model, window=ev.window, stride=ev.stride) if ev.reference_model else None
    sc = scaling(ev, rc, lm, ref, cache={})
    out = Path(args.out or rc.output_dir) / "scaling"
    flat = [{"fraction": r["fraction"], "entries": r["entries"], "domain": d, **{k: v for k, v in x.items() if k != "knn_settings"}}
            for r in sc["rows"] for d, x in r["domains"].items()]
    print(write_table(out, "scaling", flat, "Datastore scaling (test perplexity)"))
    return 0


def cmd_optout(args) -> int:
    from silo.model.lm import SiloLM
    from silo.research import owner_effect
    from silo.research.tables import write_table

    ev, rc = _configs(args)
    if args.owner:
        rc.owner_effect.owners = args.owner
    lm = SiloLM.load(ev.model, ev.store, knn=ev.knn, window=ev.window, stride=ev.stride)
    res = owner_effect(ev, rc, lm, cache={})
    rows = [{k: (v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in r.items()} for r in res["rows"]]
    print(write_table(Path(args.out or rc.output_dir) / "optout", "optout", rows, "Opt-out effect"))
    return 0


def cmd_report(args) -> int:
    from silo.research import report

    ev, rc = _configs(args)
    res = report(ev, rc)
    print((Path(res["output_dir"]) / "report.md").read_text())
    print(f"report written to {res['output_dir']}/ in {res['seconds']}s")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML with an 'eval' section and optionally 'research'")
    p.add_argument("--max-tokens", type=int, help="override eval.max_tokens (scored tokens per domain)")
    p.add_argument("--out", help="override research.output_dir")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="kNN-LM (k, λ, τ) and RIC-LM block-count grids on validation; best settings")
    _common(s)
    s.set_defaults(func=cmd_sweep)
    c = sub.add_parser("scaling", help="perplexity with growing fractions of the datastore (in memory)")
    _common(c)
    c.set_defaults(func=cmd_scaling)
    o = sub.add_parser("opt-out-effect", help="perplexity of each owner's held-out text with and without them")
    _common(o)
    o.add_argument("--owner", action="append", help="owner to measure (repeatable; default: every owner)")
    o.set_defaults(func=cmd_optout)
    r = sub.add_parser("report", help="one folder: tables (md/json/csv) and PNG plots of the risk-performance trade-off")
    _common(r)
    r.add_argument("--train-variants", action="store_true", help="train missing parametric variants first (slow)")
    r.set_defaults(func=cmd_report)
