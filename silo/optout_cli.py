"""`silo datastore` opt-out commands: remove, removals, receipt, lookup, verify-journal, resume.

Thin wrappers over `silo.datastore.removal.RemovalManager` and `silo.optout.remove_and_verify`; wired
into the `datastore` group by `register(ds)` from `silo.cli.build_parser`. Errors are `DatastoreError`s
(exit 2 via `silo.cli.main`); `verify-journal` exits 1 when the chain is broken.
"""

from __future__ import annotations

import argparse
import json
import sys


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def cmd_remove(args) -> int:
    from silo.datastore.removal import RemovalManager, RemovalRequest
    from silo.datastore.store import read_manifest

    req = RemovalRequest(owner=args.owner, document_ids=args.document or [], shards=args.shard or [],
                         requester=args.requester, reason=args.reason, request_id=args.request_id or "")
    if args.no_verify:
        mgr = RemovalManager(args.store)
        mgr.submit(req)
        _print(mgr.compact(req.request_id))
        return 0
    from silo.knn import KNNConfig
    from silo.lm import SiloLM
    from silo.optout import remove_and_verify
    from silo.training.config import validate

    model = args.model or read_manifest(args.store)["model"].get("path")
    if not model:
        raise SystemExit("error: the store manifest names no model path; give --model (or --no-verify)")
    over = {k: v for k, v in (("k", args.k), ("lmbda", args.lmbda), ("temperature", args.tau)) if v is not None}
    knn = validate(KNNConfig, over, prefix="knn", source="command line")
    lm = SiloLM.load(model, args.store, knn=knn)
    receipt = remove_and_verify(lm, req, progress=True)
    _print(receipt)
    v = receipt.get("verification") or {}
    return 0 if v.get("passed", True) else 1


def cmd_removals(args) -> int:
    from silo.datastore.removal import RemovalManager

    rows = RemovalManager(args.store).list()
    if args.json:
        _print(rows)
        return 0
    print(f"{'request':<30} {'status':<10} {'kind':<10} {'target':<30} {'entries':>9}  requester")
    for r in rows:
        target = r["owner"] or ",".join(r["document_ids"] or r["shards"])
        print(f"{r['request_id']:<30} {r['status']:<10} {r['kind']:<10} {target[:30]:<30} {r['entries']:>9,}  "
              f"{r['requester']}")
    print(f"{len(rows)} request(s)")
    return 0


def cmd_receipt(args) -> int:
    from silo.datastore.removal import RemovalManager

    _print(RemovalManager(args.store).receipt(args.request_id))
    return 0


def cmd_lookup(args) -> int:
    from silo.datastore.removal import RemovalManager

    _print(RemovalManager(args.store).lookup(document_id=args.document, text=args.text))
    return 0


def cmd_verify_journal(args) -> int:
    from silo.datastore.removal import verify_store_journal

    ok, msg, _ = verify_store_journal(args.store)
    print(("OK: " if ok else "TAMPERED: ") + msg, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_resume(args) -> int:
    from silo.datastore.removal import RemovalManager

    receipts = RemovalManager(args.store).resume_all()
    for r in receipts:
        print(f"{r['request_id']}: {r['status']} (generation {r['generations']['current']})")
    print(f"{len(receipts)} request(s) resumed")
    return 0


def register(ds: argparse._SubParsersAction) -> None:
    """Add the opt-out commands to the `silo datastore` subparsers."""
    r = ds.add_parser("remove", help="remove an owner's, documents' or shards' content (recorded, receipted)")
    r.add_argument("--store", required=True, help="datastore folder")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--owner", help="remove everything of this owner")
    what.add_argument("--document", nargs="+", metavar="ID", help="remove these document ids")
    what.add_argument("--shard", nargs="+", metavar="S", help="remove these shards")
    r.add_argument("--requester", required=True, help="who asked (recorded in the journal and receipt)")
    r.add_argument("--reason", required=True, help="why (recorded in the journal and receipt)")
    r.add_argument("--request-id", help="id for the request (default: generated)")
    r.add_argument("--model", help="model for verification (default: the store manifest's model.path)")
    r.add_argument("--no-verify", action="store_true", help="skip the LM verification (no model needed)")
    r.add_argument("--k", type=int, help="neighbours for verification (default: knn default)")
    r.add_argument("--lmbda", type=float, help="kNN weight for verification")
    r.add_argument("--tau", type=float, help="kNN temperature for verification")
    r.set_defaults(func=cmd_remove)

    rl = ds.add_parser("removals", help="list removal requests and their status")
    rl.add_argument("--store", required=True)
    rl.add_argument("--json", action="store_true", help="print JSON")
    rl.set_defaults(func=cmd_removals)

    rc = ds.add_parser("receipt", help="print the receipt of a removal request")
    rc.add_argument("--store", required=True)
    rc.add_argument("request_id")
    rc.set_defaults(func=cmd_receipt)

    lk = ds.add_parser("lookup", help="is a document or passage in the store? which shards, how many entries")
    lk.add_argument("--store", required=True)
    q = lk.add_mutually_exclusive_group(required=True)
    q.add_argument("--document", metavar="ID", help="document id")
    q.add_argument("--text", help="a passage (whitespace-normalised; sentences matched too)")
    lk.set_defaults(func=cmd_lookup)

    vj = ds.add_parser("verify-journal", help="check the journal's hash chain (exit 1 if tampered)")
    vj.add_argument("store")
    vj.set_defaults(func=cmd_verify_journal)

    rs = ds.add_parser("resume", help="finish interrupted removals and clean up unreferenced folders")
    rs.add_argument("--store", required=True)
    rs.set_defaults(func=cmd_resume)
