"""`silo serve` and `silo client ...`; wired into silo/cli.py by `register(subparsers)`."""

from __future__ import annotations

import json
import os
import sys

from silo.core.licenses import TIERS


def cmd_serve(args) -> int:
    from .config import load_serve_config
    from .metrics import setup_json_logging
    from .server import serve_forever

    overrides = {k: v for k, v in (("port", args.port), ("host", args.host), ("http_port", args.http_port),
                                   ("device", args.device), ("max_batch", args.max_batch)) if v is not None}
    if args.no_http:
        overrides["http_port"] = None
    cfg = load_serve_config(args.config, overrides)
    setup_json_logging(args.log_level)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if args.ray is not None:
        return serve_cluster(args, cfg)
    return serve_forever(cfg)


def serve_cluster(args, cfg) -> int:
    """`silo serve --ray [ADDRESS]`: replicas on a Ray cluster (serving/cluster), until SIGTERM/SIGINT."""
    from silo.core.config import read_yaml, validate

    from .cluster.config import ClusterConfig
    from .cluster.deploy import serve_on_ray

    section = read_yaml(args.config).get("cluster") or {}
    cluster = validate(ClusterConfig, {**section, **({"replicas": args.replicas} if args.replicas else {})},
                       prefix="cluster", source=args.config)
    handle = serve_on_ray(cfg, cluster, args.ray)
    print(f"silo serve --ray: {len(handle.replicas())} replica(s); gRPC (silo.v1) on {handle.grpc_target}, "
          f"HTTP on {handle.http_url}/v1 (owner page {handle.http_url}/owner)", flush=True)
    try:
        handle.wait()
    finally:
        print("silo serve --ray: stopping", flush=True)
        handle.stop()
    return 0


def _client(args):
    from .client import SiloClient

    token = args.token or os.environ.get("SILO_ADMIN_TOKEN")
    return SiloClient(args.target, token=token, tls=args.tls_ca or args.tls, timeout=args.timeout)


def _gen_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                stop=args.stop, seed=args.seed, mode=args.mode or None, k=args.k, lmbda=args.lmbda, tau=args.tau,
                return_attributions=not args.no_attributions, max_verbatim_chars=args.max_verbatim_chars,
                exclude_owners=args.exclude_owner or None, exclude_tiers=args.exclude_tier or None,
                require_notices=args.require_notices or None, ric_retriever=args.ric_retriever,
                ric_blocks=args.ric_blocks)


def _print_completion(resp, as_json: bool, streamed: bool) -> None:
    from .client import to_dict

    if as_json:
        print(json.dumps(to_dict(resp), indent=1))
        return
    if not streamed:
        print(resp.text)
    print(f"\n[finish_reason={resp.finish_reason} prompt_tokens={resp.usage.prompt_tokens} "
          f"completion_tokens={resp.usage.completion_tokens} mode={resp.mode}"
          + (f" store_generation={resp.store_generation}" if resp.HasField("store_generation") else "") + "]")
    for a in resp.attributions:
        print(f"- {a.sentence.strip()!r}: parametric {a.parametric_share:.0%}")
        for s in a.sources:
            print(f"    {s.share:.0%} {s.owner} / {s.title or s.document_id} ({s.license}, shard {s.shard})")
        for v in a.spans:
            print(f"    verbatim {v.end - v.start} chars [{v.start}:{v.end}] = {v.document_id} [{v.doc_start}:{v.doc_end}]")
    for n in resp.notices:
        print(f"notice: {n.text}")
    for e in resp.guard_events:
        print(f"guard: at character {e.offset}, steered away from {e.document_id} ({e.span} verbatim characters, "
              f"cap {e.cap})")


def _run_generation(args, method: str, payload) -> int:
    """`method` is complete or chat; --stream uses its streaming twin."""
    with _client(args) as c:
        if args.stream and not args.json:
            for piece in getattr(c, f"{method}_stream")(payload, **_gen_kwargs(args)):
                if isinstance(piece, str):
                    print(piece, end="", flush=True)
                else:
                    _print_completion(piece, False, True)
        else:
            _print_completion(getattr(c, method)(payload, **_gen_kwargs(args)), args.json, False)
    return 0


def cmd_complete(args) -> int:
    return _run_generation(args, "complete", args.prompt)


def cmd_chat(args) -> int:
    messages = []
    for m in args.message:
        role, sep, content = m.partition(":")
        if not sep:
            raise ValueError(f"--message must be ROLE:TEXT (got {m!r})")
        messages.append((role.strip(), content.strip()))
    return _run_generation(args, "chat", messages)


def cmd_score(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        r = c.score(args.text, mode=args.mode or "", k=args.k, lmbda=args.lmbda, tau=args.tau)
    if args.json:
        print(json.dumps(to_dict(r), indent=1))
    else:
        print(f"mode {r.mode}: perplexity {r.perplexity:.3f} (parametric {r.perplexity_parametric:.3f}), "
              f"{len(r.tokens)} tokens")
        for t in r.tokens:
            print(f"  {t.text!r:>16} {t.logprob:9.3f} {t.logprob_parametric:9.3f}")
    return 0


def cmd_info(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        out = to_dict(c.info())
        if args.shards:
            out["admin_shards"] = to_dict(c.list_shards())
    print(json.dumps(out, indent=1))
    return 0


def cmd_swap(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        r = c.reload_datastore() if args.reload else c.swap_datastore(args.path)
    print(json.dumps(to_dict(r), indent=1))
    return 0


def cmd_remove(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        r = c.submit_removal(owner=args.owner, document_ids=args.document or (), shards=args.shard or (),
                             requester=args.requester, reason=args.reason, wait=args.wait,
                             skip_verification=args.no_verify)
        out = {"status": to_dict(r)}
        if args.wait and r.status in ("compacted", "verified"):
            out["receipt"] = c.get_receipt(r.request_id).to_json()
    print(json.dumps(out, indent=1))
    return 0 if r.status != "failed" else 1


def cmd_removal(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        if args.receipt:
            out = c.get_receipt(args.request_id).to_json()
        elif args.request_id:
            out = to_dict(c.get_removal(args.request_id))
        else:
            out = [to_dict(r) for r in c.list_removals(args.owner or "")]
    print(json.dumps(out, indent=1))
    return 0


def cmd_ledger(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        r = c.get_ledger(args.owner or "")
    if args.json:
        print(json.dumps(to_dict(r), indent=1))
        return 0
    print(f"{'owner':<24} {'responses':>9} {'tokens':>12} {'share':>10}  removed")
    for o in r.owners:
        print(f"{o.owner:<24} {o.responses:>9} {o.tokens:>12.2f} {o.share:>10.3f}  {o.removed_at or '-'}")
    return 0


def cmd_lookup(args) -> int:
    from .client import to_dict

    with _client(args) as c:
        r = c.lookup(document_id=args.document or "", text=args.text or "")
    print(json.dumps(to_dict(r), indent=1))
    return 0 if r.in_store else 3


def _rpc_errors(fn):
    """Print a gRPC failure as one line (status code and the server's message) instead of a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        import grpc

        try:
            return fn(args)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return wrapper


def register(subparsers) -> None:
    _register_serve(subparsers)
    c = subparsers.add_parser("client", help="call a running `silo serve`")
    cs = c.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    _register_generation(cs)
    _register_owner(cs)


def _register_serve(subparsers) -> None:
    s = subparsers.add_parser("serve", help="gRPC completion/chat backend (silo.v1) with health, metrics, admin; "
                                            "with serve.http_port also the OpenAI-compatible HTTP API and the "
                                            "data owners' web page, on the same model")
    s.add_argument("--config", required=True, help="YAML file with a serve section")
    s.add_argument("--port", type=int, help="override serve.port, the gRPC port (0 = a free port)")
    s.add_argument("--http-port", type=int, help="override serve.http_port: the HTTP door (OpenAI-compatible /v1 "
                                                  "API and the owner page at /owner) on this port (0 = a free port)")
    s.add_argument("--no-http", action="store_true", help="serve gRPC only, even if the config sets serve.http_port")
    s.add_argument("--host", help="override serve.host")
    s.add_argument("--device", help="override serve.device, the model's: auto | cpu | cuda | cuda:N")
    s.add_argument("--max-batch", type=int, help="override serve.max_batch (generations advanced together)")
    s.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="serve replicas on a Ray cluster (auto: the cluster this node belongs to, after `ray start`; "
                        "or the head's ADDRESS): the config's `cluster` section says how many")
    s.add_argument("--replicas", type=int, help="with --ray: override cluster.replicas")
    s.add_argument("--log-level", default="INFO")
    s.set_defaults(func=cmd_serve)


def _common_args(p) -> None:
    """Every client command's: where the server is, the token, TLS, deadline, JSON output."""
    p.add_argument("--target", default="127.0.0.1:50051", help="host:port (default: %(default)s)")
    p.add_argument("--token", help="admin or data-owner token (default: $SILO_ADMIN_TOKEN)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", help="TLS with this PEM CA certificate")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline per call in seconds")
    p.add_argument("--json", action="store_true", help="print the response as JSON")


def _knn_args(p) -> None:
    p.add_argument("--mode", choices=["parametric", "knn", "ric"],
                   help="default: knn when the server has a store; ric needs RIC-LM blocks in the store")
    p.add_argument("--k", type=int)
    p.add_argument("--lmbda", type=float)
    p.add_argument("--tau", type=float)


def _generation_args(p) -> None:
    """complete's and chat's: retrieval, sampling, streaming and output controls."""
    _common_args(p)
    _knn_args(p)
    p.add_argument("--ric-retriever", choices=["bm25", "dense"], help="mode ric: which block index")
    p.add_argument("--ric-blocks", type=int, help="mode ric: blocks prepended (1-8)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--no-attributions", action="store_true")
    p.add_argument("--max-verbatim-chars", type=int,
                   help="cap on a verbatim span of any one store document (only lowers the server's caps)")
    p.add_argument("--exclude-owner", action="append", help="never surface this owner's documents (repeatable)")
    p.add_argument("--exclude-tier", action="append", choices=TIERS,
                   help="never surface this licence tier (repeatable)")
    p.add_argument("--require-notices", action="store_true", help="a licence notice for every source")


def _register_generation(cs) -> None:
    """complete, chat, score, info, swap."""
    p = cs.add_parser("complete", help="complete a prompt")
    p.add_argument("prompt")
    _generation_args(p)
    p.set_defaults(func=_rpc_errors(cmd_complete))
    p = cs.add_parser("chat", help="chat: --message user:'Hello' [--message assistant:... ...]")
    p.add_argument("--message", "-m", action="append", required=True, help="ROLE:TEXT, roles system|user|assistant")
    _generation_args(p)
    p.set_defaults(func=_rpc_errors(cmd_chat))
    p = cs.add_parser("score", help="perplexity and per-token log-probs of a text")
    p.add_argument("text")
    _common_args(p)
    _knn_args(p)
    p.set_defaults(func=_rpc_errors(cmd_score))
    p = cs.add_parser("info", help="model, fingerprint, store generation and shards")
    _common_args(p)
    p.add_argument("--shards", action="store_true", help="also call Admin.ListShards (needs --token)")
    p.set_defaults(func=_rpc_errors(cmd_info))
    p = cs.add_parser("swap", help="admin: swap in the store at PATH, or --reload the current one")
    p.add_argument("path", nargs="?")
    p.add_argument("--reload", action="store_true")
    _common_args(p)
    p.set_defaults(func=_rpc_errors(cmd_swap))


def _register_owner(cs) -> None:
    """remove, removals, ledger, lookup: the data-owner calls."""
    p = cs.add_parser("remove", help="data owner: remove an owner's content, documents or shards (needs --token)")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--owner")
    who.add_argument("--document", action="append", help="document id (repeatable)")
    who.add_argument("--shard", action="append", help="shard name (repeatable)")
    p.add_argument("--requester", required=True, help="who asks for the removal")
    p.add_argument("--reason", required=True, help="why")
    p.add_argument("--wait", action="store_true", help="return when compacted and verified, with the receipt")
    p.add_argument("--no-verify", action="store_true", help="skip the model-based verification")
    _common_args(p)
    p.set_defaults(func=_rpc_errors(cmd_remove))
    p = cs.add_parser("removals", help="data owner: list removals, or one request's status / receipt")
    p.add_argument("request_id", nargs="?")
    p.add_argument("--receipt", action="store_true", help="print the receipt of REQUEST_ID")
    p.add_argument("--owner", help="only this owner's requests")
    _common_args(p)
    p.set_defaults(func=_rpc_errors(cmd_removal))
    p = cs.add_parser("ledger", help="contribution ledger totals (owner token: its own line; admin: every owner)")
    p.add_argument("--owner", help="only this owner")
    _common_args(p)
    p.set_defaults(func=_rpc_errors(cmd_ledger))
    p = cs.add_parser("lookup", help="is a document or passage in the datastore? (exit 3 if not)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--document", help="document id")
    what.add_argument("--text", help="a passage")
    _common_args(p)
    p.set_defaults(func=_rpc_errors(cmd_lookup))


def _main() -> int:  # for `python -m silo.serving.cli` without the silo entry point
    import argparse

    ap = argparse.ArgumentParser(prog="silo")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(_main())
