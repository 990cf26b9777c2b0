"""`silo ledger report`: the contribution ledger of a server (serving/ledger.py) as CSV."""

from __future__ import annotations

import sys
from pathlib import Path


def _ledger_path(args) -> str:
    if args.ledger:
        return args.ledger
    if args.config:
        from silo.core.config import ConfigError
        from silo.serving.config import load_serve_config

        path = load_serve_config(args.config).ledger
        if not path:
            raise ConfigError(f"{args.config}: serve.ledger is not set; give --ledger FILE")
        return path
    raise SystemExit("error: give --ledger FILE or --config with a serve.ledger")


def cmd_report(args) -> int:
    from silo.serving.ledger import Ledger, write_report

    path = _ledger_path(args)
    if not Path(path).is_file():
        print(f"error: {path}: no ledger file (a server with serve.ledger writes it)", file=sys.stderr)
        return 2
    ledger = Ledger(path)
    try:
        if args.out:
            import io

            from silo.core.files import write_bytes_atomic

            buf = io.StringIO()
            n = write_report(ledger, buf, args.owner, args.per_response)
            write_bytes_atomic(Path(args.out), buf.getvalue().encode("utf-8"))  # never a half-written report
            print(f"{n} line(s) written to {args.out}", file=sys.stderr)
        else:
            write_report(ledger, sys.stdout, args.owner, args.per_response)
    finally:
        ledger.close()
    return 0


def register(sub) -> None:
    g = sub.add_parser("ledger", help="the contribution ledger: attributed tokens and shares per data owner")
    gs = g.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    r = gs.add_parser(
        "report", help="CSV: per owner, responses, attributed tokens, summed shares, first/last credit, removal",
        description="Per owner: responses that credited it, attributed tokens (sum over sentences of the "
                    "owner's share times the sentence's tokens), summed shares of responses, first and last "
                    "credit (UTC), and when the owner opted out (its history stays; no credit after it). "
                    "--per-response lists every credit behind the totals. Safe to run while a server writes.")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--ledger", help="the ledger's SQLite file")
    where.add_argument("--config", help="YAML whose serve.ledger names the file")
    r.add_argument("--owner", help="only this owner")
    r.add_argument("--per-response", action="store_true", help="one line per response and owner instead of totals")
    r.add_argument("--out", help="write the CSV here instead of standard output")
    r.set_defaults(func=cmd_report)
