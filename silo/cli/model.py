"""`silo eval` and `silo generate`."""

from __future__ import annotations

import sys

from silo.core.licenses import TIERS
from silo.core.models import DEVICE_HELP


def cmd_eval(args) -> int:
    from silo.core.config import load_section
    from silo.workflows.evaluate import EvalConfig, evaluate, markdown_table

    overrides = {"max_tokens": args.max_tokens} if args.max_tokens else {}
    if args.keep_overlap:
        overrides["keep_overlap"] = True
    cfg = load_section(args.config, "eval", EvalConfig, overrides)
    out = evaluate(cfg)
    print(markdown_table(out))
    print(f"written to {cfg.output_dir}/results.md, results.json, sweep.json")
    return 0


def load_lm_from_args(args):
    """SiloLM from --config (sections lm, knn) and the command line's overrides."""
    from silo.core.config import load_section, read_yaml, validate
    from silo.model.knn import KNNConfig
    from silo.model.lm import SiloLM

    model, store, knn, lm_sec = args.model, args.store, KNNConfig(), {}
    if args.config:
        data = read_yaml(args.config)
        lm_sec = data.get("lm") or {}
        model = model or lm_sec.get("model")
        store = store or lm_sec.get("store")
        if "knn" in data:
            knn = load_section(args.config, "knn", KNNConfig)
    if not model:
        raise SystemExit("error: give --model (or --config with an 'lm' section naming the model)")
    over = {k: v for k, v in (("k", args.k), ("lmbda", args.lmbda), ("tau", args.tau)) if v is not None}
    if over:
        over["mixture"] = "fixed"  # explicit kNN settings ask for the constant lambda
    knn = validate(KNNConfig, {**knn.model_dump(), **over}, prefix="knn", source="command line")
    device = args.device or (lm_sec.get("device") if args.config else None) or "auto"
    return SiloLM.load(model, None if args.mode == "parametric" else store, knn=knn, device=device,
                       dtype=(lm_sec.get("dtype") if args.config else None) or "auto")


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
        for v in a.spans:
            print(f"    verbatim: completion [{v.start}:{v.end}] = {v.document_id} [{v.doc_start}:{v.doc_end}] "
                  f"{comp.text[v.start:v.end][:100]!r}", file=out)
        for t in a.training:
            print(f"    training data: completion [{t.start}:{t.end}] = {t.document_id} [{t.doc_start}:{t.doc_end}] "
                  f"({t.license}; {t.count} occurrence(s)) {comp.text[t.start:t.end][:100]!r}", file=out)
    if comp.notices:
        print("\nlicence notices:", file=out)
        for n in comp.notices:
            print(f"  {n.text()}" + (" [training data]" if n.origin == "training" else ""), file=out)
    for e in comp.guard_events:
        print(f"\n[guard: at character {e.offset} the completion held {e.span} characters of {e.document_id} "
              f"verbatim (cap {e.cap}); {e.blocked_tokens} continuing token(s) blocked]", file=out)


def output_policy_from_args(args):
    """The config's `output_policy` section (nothing capped without one), tightened by the command line."""
    from silo.core.config import read_yaml, validate
    from silo.model.output_policy import OutputPolicy

    data = read_yaml(args.config).get("output_policy") if args.config else None
    policy = validate(OutputPolicy, data, prefix="output_policy", source=args.config) if data else OutputPolicy()
    return policy.restricted(args.max_verbatim_chars, args.exclude_owner or (), args.exclude_tier or (),
                             args.require_notices)


def verbatim_cap(value: str) -> int:
    """argparse type of --max-verbatim-chars."""
    import argparse

    from silo.model.output_policy import MIN_CAP

    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if n < MIN_CAP:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_CAP} (got {n})")
    return n


def cmd_generate(args) -> int:
    from silo.model.sampling import SamplingParams

    lm = load_lm_from_args(args)
    mode = args.mode if lm.store is not None or args.mode == "parametric" else "parametric"
    sampling = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed)
    comp = lm.complete(args.prompt, sampling, lm.retriever(mode), policy=output_policy_from_args(args))
    print(args.prompt + "\u2502", end="")
    print_attributed(comp)
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="perplexity per domain: parametric, kNN-LM (tuned on val), reference")
    e.add_argument("--config", required=True, help="YAML file with an eval section")
    e.add_argument("--max-tokens", type=int, help="override eval.max_tokens (scored tokens per domain)")
    e.add_argument("--keep-overlap", action="store_true",
                   help="keep held-out documents that share 13-grams with the store (left out by default)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="complete a prompt; each sentence's sources and verbatim spans, licence notices")
    g.add_argument("prompt")
    g.add_argument("--config", help="YAML with 'lm' (model, store), 'knn' and 'output_policy' sections")
    g.add_argument("--model", help="model folder or hub id (overrides the config)")
    g.add_argument("--store", help="datastore folder (overrides the config)")
    g.add_argument("--mode", choices=["knn", "parametric"], default="knn")
    g.add_argument("--device", help=f"the model's device: {DEVICE_HELP} (default: lm.device, else auto)")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--k", type=int, help="neighbours (with --lmbda/--tau: the fixed mixture; default: the gate)")
    g.add_argument("--lmbda", type=float, help="weight of the kNN term: asks for the fixed mixture")
    g.add_argument("--tau", type=float, help="kNN tau (bandwidth on squared L2 distances): asks for the fixed mixture")
    g.add_argument("--max-verbatim-chars", type=verbatim_cap, metavar="N",
                   help="cap on a verbatim span of any one store document (only lowers output_policy's caps)")
    g.add_argument("--exclude-owner", action="append", help="never surface this owner's documents (repeatable)")
    g.add_argument("--exclude-tier", action="append", choices=TIERS,
                   help="never surface documents of this licence tier (repeatable)")
    g.add_argument("--require-notices", action="store_true", help="a licence notice for every source")
    g.set_defaults(func=cmd_generate)
