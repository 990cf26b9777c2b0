"""`silo train`."""

from __future__ import annotations


def cmd_train(args) -> int:
    from silo.core.config import load_section
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


def cmd_index(args) -> int:
    from silo.core.config import load_section
    from silo.training.train import TrainConfig, index_trained_model

    overrides = {"output_dir": args.model} if args.model else {}
    cfg = load_section(args.config, args.section, TrainConfig, overrides)
    info = index_trained_model(cfg, args.model)
    print(f"training-data index of {args.model or cfg.output_dir}: {info['documents']} documents, "
          f"{info['tokens']:,} tokens, {info['bytes'] / max(info['tokens'], 1):.1f} bytes/token")
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train the parametric LM on permitted text (writes provenance.json)")
    t.add_argument("--config", required=True, help="YAML file with a train section")
    t.add_argument("--section", default="train", help="section of the YAML to use (default: %(default)s; "
                   "e.g. 'reference' for the everything-allowed reference LM)")
    t.add_argument("--drop-disallowed", action="store_true",
                   help="drop documents outside the policy (and report counts) instead of stopping")
    t.add_argument("--max-steps", type=int, help="override train.max_steps")
    t.add_argument("--output-dir", help="override train.output_dir")
    t.set_defaults(func=cmd_train)
    i = sub.add_parser("index", help="write the training-data index (tracing, guard over training text) of a "
                                     "model trained without one")
    i.add_argument("--config", required=True, help="YAML file with the train section the model was trained with")
    i.add_argument("--section", default="train", help="section of the YAML (default: %(default)s)")
    i.add_argument("--model", help="the model folder (default: the section's output_dir)")
    i.set_defaults(func=cmd_index)
