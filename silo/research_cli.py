"""CLI for RIC-LM blocks and the research harness: `silo datastore build-blocks`, `silo sweep`,
`silo scaling`, `silo opt-out-effect`, `silo report`. Registered by silo/cli.py through `register`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _configs(args):
    from .research import load_research

    ev_over = {"max_tokens": args.max_tokens} if getattr(args, "max_tokens", None) else {}
    over = {"output_dir": args.out} if getattr(args, "out", None) else {}
    if getattr(args, "train_variants", False):
        over["train_variants"] = True
    return load_research(args.config, ev_over, over)


def cmd_build_blocks(args) -> int:
    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks
    from silo.datastore.store import DatastoreError, read_manifest

    model = args.model or read_manifest(Path(args.store))["model"].get("path")
    if not model:
        raise DatastoreError(f"{args.store}: the manifest names no model; pass --model for its tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise DatastoreError(f"cannot load the tokenizer of {model!r}: {exc}; pass --model") from None
    info = build_blocks(args.store, tok, args.block_tokens, args.stride, tuple(args.retriever or ("bm25", "dense")),
                        dense_model=args.dense_model)
    print(json.dumps({k: {f: v[f] for f in ("blocks", "documents", "block_tokens", "stride", "retrievers", "seconds")}
                      for k, v in info.items()}, indent=1))
    return 0


def cmd_sweep(args) -> int:
    from .research import sweep, write_table

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
    from silo.lm import SiloLM

    from .research import scaling, write_table

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
    from silo.lm import SiloLM

    from .research import optout, write_table

    ev, rc = _configs(args)
    if args.owner:
        rc.optout.owners = args.owner
    lm = SiloLM.load(ev.model, ev.store, knn=ev.knn, window=ev.window, stride=ev.stride)
    res = optout(ev, rc, lm, cache={})
    rows = [{k: (v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in r.items()} for r in res["rows"]]
    print(write_table(Path(args.out or rc.output_dir) / "optout", "optout", rows, "Opt-out effect"))
    return 0


def cmd_report(args) -> int:
    from .research import report

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
    """Add the commands to `silo`'s top-level subparsers (and `build-blocks` under `silo datastore`)."""
    ds = next((a for a in sub.choices["datastore"]._actions if isinstance(a, argparse._SubParsersAction)), None)
    if ds is not None:
        b = ds.add_parser("build-blocks", help="cut the store's text into blocks and index them for RIC-LM "
                                               "(BM25 and/or dense), inside each shard's folder")
        b.add_argument("--store", required=True, help="datastore folder")
        b.add_argument("--model", help="model whose tokenizer cuts the blocks (default: the manifest's model)")
        b.add_argument("--block-tokens", type=int, default=128, help="tokens per block (default: %(default)s)")
        b.add_argument("--stride", type=int, default=64, help="tokens between block starts (default: %(default)s)")
        b.add_argument("--retriever", action="append", choices=["bm25", "dense"],
                       help="index to build (repeatable; default: bm25 and dense)")
        b.add_argument("--dense-model", help="local sentence-transformers folder (default: bundled all-MiniLM-L6-v2)")
        b.set_defaults(func=cmd_build_blocks)

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
