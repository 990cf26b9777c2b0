"""`silo datastore build | info | reindex | build-blocks | remove | removals | receipt | verify-removal | lookup |
verify-journal | resume`.

Thin wrappers over `silo.datastore` (build, blocks, the removal state machine, lookup) and
`silo.workflows.removal.remove_and_verify`. Errors are `DatastoreError`s (exit 2 via `silo.cli.main`);
`verify-journal` exits 1 when the chain is broken.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def cmd_build(args) -> int:
    from silo.core.config import load_section
    from silo.datastore.build import DatastoreConfig, build_datastore

    overrides = {"overwrite": True} if args.overwrite else {}
    cfg = load_section(args.config, "datastore", DatastoreConfig, overrides)
    store = build_datastore(cfg, config_source=args.config)
    if store is not None:  # None on the other ranks of an `accelerate launch` build: the main one prints
        print(json.dumps(store.summary().to_json(), indent=1))
    return 0


def cmd_info(args) -> int:
    from silo.datastore.store import Datastore
    from silo.model.gate import Gate

    store = Datastore.open(args.store)
    out = store.summary().to_json()
    gate = Gate.load(store)
    if gate is None:
        out["gate"] = "none: the gated mixture falls back to the fixed one; fit it with `silo datastore fit-gate`"
    else:
        g = gate.describe()
        g["fitted_on_generation"] = g.pop("generation")
        g["validation"] = {d: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
                           for d, r in gate.report.get("domains", {}).items()}
        g["warnings"] = gate.report.get("warnings", [])
        g["held_out_check"] = gate.report.get("check", {}).get("held_out", {})
        if gate.mode != "gated":  # a fallback: say what is served and why, first
            g = {"SERVES": f"the {gate.mode} mixture (fallback), not the fitted gate", **g}
        out["gate"] = g
    print(json.dumps(out, indent=1))
    return 0


def cmd_reindex(args) -> int:
    from silo.workflows.reindex import reindex_with_report

    _print(reindex_with_report(args.store, args.factory, args.train_sample, args.nprobe, val=args.val,
                               model=args.model, k=args.k, max_tokens=args.max_tokens, queries=args.queries).to_json())
    return 0


def cmd_fit_gate(args) -> int:
    from silo.core.config import load_section
    from silo.workflows.gate_fit import GateConfig, fit_store_gate

    over = {k: v for k, v in (("store", args.store), ("max_tokens", args.max_tokens)) if v is not None}
    if args.keep_overlap:
        over["keep_overlap"] = True
    cfg = load_section(args.config, "gate", GateConfig, over)
    gate, report = fit_store_gate(cfg)
    print(json.dumps({"mode": gate.mode, "fallback": gate.fallback, "lambda_max": gate.lambda_max,
                      "fixed_lambda": gate.fixed_lambda, "k": gate.k, "tau": gate.tau, "tau_ref": gate.tau_ref,
                      "tau_slope": gate.tau_slope, "match_bonus": gate.match_bonus, "min_lambda": gate.min_lambda,
                      "skip_threshold": gate.skip.threshold if gate.skip else None,
                      "validation": report["domains"], "warnings": report["warnings"]}, indent=1))
    return 0


def cmd_build_infgram(args) -> int:
    from transformers import AutoTokenizer

    from silo.datastore.format import DatastoreError, Manifest
    from silo.datastore.infgram import build_infgram

    model = args.model or Manifest.read(Path(args.store)).model.path
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except OSError as exc:
        raise DatastoreError(f"cannot load the tokenizer of {model!r}: {exc}; pass --model") from None
    info = build_infgram(args.store, tok.eos_token_id)
    print(json.dumps({k: {f: v[f] for f in ("documents", "tokens", "bytes", "seconds")} for k, v in info.items()},
                     indent=1))
    return 0


def cmd_fit_infgram(args) -> int:
    from silo.core.config import load_section
    from silo.workflows.gate_fit import GateConfig
    from silo.workflows.infgram_fit import fit_store_infgram

    over = {k: v for k, v in (("store", args.store), ("max_tokens", args.max_tokens)) if v is not None}
    cfg = load_section(args.config, "gate", GateConfig, over)
    gates = fit_store_infgram(cfg, bases=tuple(args.base or ("lm", "knn")))
    print(json.dumps({k: {**g.describe(), "validation": g.report.get("domains"), "warnings": g.report.get("warnings")}
                      for k, g in gates.items()}, indent=1))
    return 0


def cmd_build_blocks(args) -> int:
    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks
    from silo.datastore.format import DatastoreError, Manifest

    model = args.model or Manifest.read(Path(args.store)).model.path
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


def cmd_remove(args) -> int:
    from silo.datastore.format import Manifest
    from silo.datastore.removal import RemovalManager
    from silo.datastore.removal_records import RemovalRequest

    req = RemovalRequest(owner=args.owner, document_ids=args.document or [], shards=args.shard or [],
                         requester=args.requester, reason=args.reason, request_id=args.request_id or "")
    if args.no_verify:
        mgr = RemovalManager(args.store)
        mgr.submit(req)
        _print(mgr.compact(req.request_id).to_json())
        return 0
    from silo.core.config import validate
    from silo.model.knn import KNNConfig
    from silo.model.lm import SiloLM
    from silo.workflows.removal import remove_and_verify

    model = args.model or Manifest.read(args.store).model.path
    if not model:
        raise SystemExit("error: the store manifest names no model path; give --model (or --no-verify)")
    over = {k: v for k, v in (("k", args.k), ("lmbda", args.lmbda), ("tau", args.tau)) if v is not None}
    knn = validate(KNNConfig, over, prefix="knn", source="command line")
    lm = SiloLM.load(model, args.store, knn=knn)
    receipt = remove_and_verify(lm, req, progress=True)
    _print(receipt.to_json())
    return 0 if receipt.passed in (None, True) else 1


def cmd_removals(args) -> int:
    from silo.datastore.removal import RemovalManager

    states = RemovalManager(args.store).list()
    if args.json:
        _print([{"request_id": s.request_id, "kind": s.request.kind, "owner": s.request.owner,
                 "document_ids": s.request.document_ids, "shards": s.request.shards,
                 "requester": s.request.requester, "created": s.request.created, "status": s.status,
                 "entries": s.targets.entries} for s in states])
        return 0
    print(f"{'request':<30} {'status':<10} {'kind':<10} {'target':<30} {'entries':>9}  requester")
    for s in states:
        r = s.request
        target = r.owner or ",".join(r.document_ids or r.shards)
        print(f"{s.request_id:<30} {s.status:<10} {r.kind:<10} {target[:30]:<30} {s.targets.entries:>9,}  "
              f"{r.requester}")
    print(f"{len(states)} request(s)")
    return 0


def cmd_receipt(args) -> int:
    from silo.datastore.removal import RemovalManager

    _print(RemovalManager(args.store).receipt(args.request_id).to_json())
    return 0


def cmd_verify_removal(args) -> int:
    from silo.workflows.exactness import ExactnessOptions, verify_exactness

    opts = ExactnessOptions(heldout=args.heldout, nonmembers=args.nonmembers, request_id=args.request_id,
                            model=args.model, reference=Path(args.reference) if args.reference else None,
                            max_tokens=args.max_tokens, passages=args.passages, max_keys=args.max_keys,
                            scan=[Path(p) for p in args.scan or []])
    report = verify_exactness(args.store, opts)
    _print(report)
    return 0 if report["passed"] else 1


def cmd_lookup(args) -> int:
    from silo.datastore.lookup import lookup
    from silo.datastore.store import Datastore

    # the operator's own view (everything that matches): the server gives callers less (counts, own ids)
    _print(lookup(Datastore.open(args.store), document_id=args.document, text=args.text).to_json())
    return 0


def cmd_verify_journal(args) -> int:
    from silo.datastore.journal import verify_store_journal

    ok, msg, _ = verify_store_journal(args.store)
    print(("OK: " if ok else "TAMPERED: ") + msg, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_resume(args) -> int:
    from silo.datastore.removal import RemovalManager

    receipts = RemovalManager(args.store).resume_all()
    for r in receipts:
        print(f"{r.request_id}: {r.status} (generation {r.generations.current})")
    print(f"{len(receipts)} request(s) resumed")
    return 0


def register(sub) -> None:
    d = sub.add_parser("datastore", help="build, inspect and remove from kNN datastores")
    ds = d.add_subparsers(dest="datastore_command", required=True, metavar="ACTION")
    _register_build(ds)
    _register_removal(ds)


def _register_build(ds) -> None:
    """build, info, reindex, fit-gate, build-blocks: making and inspecting a store."""
    db = ds.add_parser("build", help="encode a corpus with the model into a sharded FAISS store")
    db.add_argument("--config", required=True, help="YAML file with a datastore section")
    db.add_argument("--overwrite", action="store_true", help="replace an existing store (atomically)")
    db.set_defaults(func=cmd_build)
    di = ds.add_parser("info", help="generation, shards and entry counts of a store")
    di.add_argument("store")
    di.set_defaults(func=cmd_info)
    ri = ds.add_parser(
        "reindex", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="new FAISS indexes for every shard from the stored keys (no LM pass), as a new generation",
        description="Build a new index of type --factory for every shard from its stored keys (keys.npy), "
                    "with one quantizer trained on keys sampled across the shards and shared by all, as a new "
                    "generation: new shard folders, then one manifest write, then the old folders are deleted "
                    "(a crash leaves the old or the new generation; `silo datastore resume` cleans up). Prints "
                    "recall@k against exact search over the stored keys and, with --val, the perplexity of the "
                    "validation text before and after under the store's served mixture.",
        epilog="example:\n  silo datastore reindex runs/demo/store --factory IVF1024,PQ32 --nprobe 32 "
               "--val pkg:demo/val")
    ri.add_argument("store", help="datastore folder")
    ri.add_argument("--factory", required=True,
                    help='FAISS index_factory string, e.g. "IVF4096,PQ64", "IVF1024,SQ8", "Flat"')
    ri.add_argument("--train-sample", type=int, default=200_000,
                    help="keys sampled to train the shared quantizer (default: %(default)s)")
    ri.add_argument("--nprobe", type=int, help="IVF lists visited per query (default: keep the store's)")
    ri.add_argument("--val", nargs="+", metavar="CORPUS",
                    help="validation corpus: recall queries from its keys, and perplexity before/after")
    ri.add_argument("--model", help="model for --val (default: the manifest's model path)")
    ri.add_argument("--k", type=int, default=32, help="recall@k is reported for 1, 10 and k (default: %(default)s)")
    ri.add_argument("--max-tokens", type=int, default=4000, help="validation tokens per domain (default: %(default)s)")
    ri.add_argument("--queries", type=int, default=512, help="queries for recall (default: %(default)s)")
    ri.set_defaults(func=cmd_reindex)
    fg = ds.add_parser("fit-gate", help="fit the store's per-token mixture gate (and retrieval skipping) on "
                                         "validation text; saved as STORE/gate.json")
    fg.add_argument("--config", required=True, help="YAML file with a gate section (model, store, val, ...)")
    fg.add_argument("--store", help="override gate.store")
    fg.add_argument("--max-tokens", type=int, help="override gate.max_tokens (validation tokens per domain)")
    fg.add_argument("--keep-overlap", action="store_true",
                    help="keep validation documents that are near-copies of store text (left out by default)")
    fg.set_defaults(func=cmd_fit_gate)
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
    ig = ds.add_parser("build-infgram", help="an inf-gram (suffix-array) index in each shard's folder, from its "
                                             "entries: mode infgram, and removal drops it with the shard")
    ig.add_argument("--store", required=True, help="datastore folder")
    ig.add_argument("--model", help="model whose BOS separates documents (default: the manifest's model)")
    ig.set_defaults(func=cmd_build_infgram)
    fi = ds.add_parser("fit-infgram", help="fit the inf-gram's gates (over the LM, over the served kNN-LM) on "
                                           "validation text, by the kNN gate's machinery: STORE/infgram.json")
    fi.add_argument("--config", required=True, help="YAML file with a gate section (model, store, val, ...)")
    fi.add_argument("--store", help="override gate.store")
    fi.add_argument("--max-tokens", type=int, help="override gate.max_tokens (validation tokens per domain)")
    fi.add_argument("--base", action="append", choices=["lm", "knn"], help="which gate (repeatable; default both)")
    fi.set_defaults(func=cmd_fit_infgram)


def _register_removal(ds) -> None:
    """remove, removals, receipt, lookup, verify-journal, resume: opt-out and its records."""
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
    r.add_argument("--tau", type=float, help="kNN tau for verification")
    r.set_defaults(func=cmd_remove)

    rl = ds.add_parser("removals", help="list removal requests and their status")
    rl.add_argument("--store", required=True)
    rl.add_argument("--json", action="store_true", help="print JSON")
    rl.set_defaults(func=cmd_removals)

    rc = ds.add_parser("receipt", help="print the receipt of a removal request")
    rc.add_argument("--store", required=True)
    rc.add_argument("request_id")
    rc.set_defaults(func=cmd_receipt)

    ve = ds.add_parser(
        "verify-removal", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="prove a removal exact: compare the store with one built from scratch without the removed content, "
             "MUSE-style report, byte scan; recorded in the receipt",
        description="Build the store again from its recorded config without everything its removals removed (same "
                    "seed), then compare: every file of every shard, the quantizer, search results for probe "
                    "queries and the served next-token distributions on held-out text (within 1e-5). Adds a "
                    "MUSE-style report (verbatim, Min-K%++ membership AUC and PrivLeak against never-seen "
                    "documents of the same kind, utility per held-out domain relative to the rebuild, "
                    "sustainability over the store's removals) and scans every file of the store for the removed "
                    "documents' text, token ids, keys and codes. Exit 1 when anything differs or is found.",
        epilog="example:\n  silo datastore verify-removal --store runs/demo/store-served --heldout pkg:demo/test")
    ve.add_argument("--store", required=True, help="datastore folder")
    ve.add_argument("--heldout", nargs="+", required=True, metavar="CORPUS",
                    help="held-out text: served distributions and utility per domain")
    ve.add_argument("--request-id", help="the removal to report on (default: the latest finished one)")
    ve.add_argument("--nonmembers", nargs="+", metavar="CORPUS",
                    help="never-seen documents of the removed kind, beside those of the build corpus the store "
                         "never held (the membership test's non-members)")
    ve.add_argument("--model", help="the model (default: the manifest's model path)")
    ve.add_argument("--reference", help="build the reference store here and keep it (default: a temporary folder)")
    ve.add_argument("--max-tokens", type=int, default=2000, help="held-out tokens per domain (default: %(default)s)")
    ve.add_argument("--passages", type=int, default=32,
                    help="passages of members and of non-members for the membership test (default: %(default)s)")
    ve.add_argument("--max-keys", type=int, default=16384,
                    help="removed keys (and their codes) to scan the files for (default: %(default)s)")
    ve.add_argument("--scan", nargs="+", metavar="FILE",
                    help="more files to scan for the removed bytes (the contribution ledger)")
    ve.set_defaults(func=cmd_verify_removal)

    lk = ds.add_parser("lookup", help="is a document or passage in the store? which shards, how many entries")
    lk.add_argument("--store", required=True)
    q = lk.add_mutually_exclusive_group(required=True)
    q.add_argument("--document", metavar="ID", help="document id")
    q.add_argument("--text", help="a passage: which of its sentences (20+ characters, whitespace-normalised) "
                                  "a live document holds, matched by hash")
    lk.set_defaults(func=cmd_lookup)

    vj = ds.add_parser("verify-journal", help="check the journal's hash chain (exit 1 if tampered)")
    vj.add_argument("store")
    vj.set_defaults(func=cmd_verify_journal)

    rs = ds.add_parser("resume", help="finish interrupted removals and clean up unreferenced folders")
    rs.add_argument("--store", required=True)
    rs.set_defaults(func=cmd_resume)
