"""Load test for `silo serve`: N concurrent streaming clients for a fixed duration (not a test).

    python benchmarks/load.py --target 127.0.0.1:50051 --concurrency 1,8,32 --duration 20
    python benchmarks/load.py --model runs/demo/model --store runs/demo/store --concurrency 1,8,32
    python benchmarks/load.py --model runs/demo/model --store runs/demo/store --modes parametric,knn

Each mode runs every level in turn against the same server; the summary prints the ratios the serving
engine is judged by: kNN (with attributions) over parametric tokens/s at 1 stream, and each mode's
tokens/s at 8 streams over 1 stream (continuous batching).

With --model the script starts its own server on 127.0.0.1 (port 0). Prints, per concurrency level,
requests/s, generated tokens/s, p50/p95 latency, p50/p95 time to first token and errors by status code.
Bounded on purpose: loopback targets only, at most 64 streams, at most 300 s per level.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
import threading
import time
from collections import Counter

import grpc

from silo.serving.client import SiloClient
from silo.serving.gen import silo_pb2 as pb

MAX_STREAMS, MAX_SECONDS = 64, 300.0


def loopback_only(target: str) -> str:
    host = target.rsplit(":", 1)[0].strip("[]")
    for info in socket.getaddrinfo(host, None):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing {target}: this script only loads loopback addresses")
    return target


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_level(target: str, streams: int, duration: float, args) -> dict:
    stop_at = time.monotonic() + duration
    lock = threading.Lock()
    lat, ttft, errors = [], [], Counter()
    tokens = [0]

    def client_loop(i: int) -> None:
        with SiloClient(target, timeout=duration + 60) as c:
            n = 0
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                first = None
                try:
                    for piece in c.complete_stream(args.prompt, max_tokens=args.max_tokens, seed=i * 100000 + n,
                                                   temperature=args.temperature, mode=args.mode or None,
                                                   return_attributions=args.attributions):
                        if first is None and isinstance(piece, str):
                            first = time.monotonic() - t0
                        if isinstance(piece, pb.CompleteResponse):
                            with lock:
                                tokens[0] += piece.usage.completion_tokens
                                lat.append(time.monotonic() - t0)
                                if first is not None:
                                    ttft.append(first)
                except grpc.RpcError as exc:
                    with lock:
                        errors[exc.code().name] += 1
                    time.sleep(0.05)  # back off a little on RESOURCE_EXHAUSTED instead of spinning
                n += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    wall = time.monotonic() - t0
    return dict(streams=streams, wall=wall, ok=len(lat), rps=len(lat) / wall, tps=tokens[0] / wall,
                p50=pct(lat, 0.5), p95=pct(lat, 0.95), ttft50=pct(ttft, 0.5), ttft95=pct(ttft, 0.95),
                errors=dict(errors))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="host:port of a running server (loopback only)")
    ap.add_argument("--model", help="start a server on 127.0.0.1 with this model instead")
    ap.add_argument("--store", help="datastore for the started server")
    ap.add_argument("--max-queue", type=int, default=64, help="queue bound of the started server")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--prompt", default="In the beginning")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--modes", "--mode", default="", help="comma-separated: parametric, knn, ric (default: the "
                    "server's default mode)")
    ap.add_argument("--no-attributions", dest="attributions", action="store_false",
                    help="do not ask for per-sentence attributions (asked for by default)")
    ap.add_argument("--max-batch", type=int, default=8, help="continuous-batching width of the started server")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m] or [""]
    levels = [int(x) for x in args.concurrency.split(",")]
    if any(not 1 <= n <= MAX_STREAMS for n in levels) or not 0 < args.duration <= MAX_SECONDS:
        raise SystemExit(f"concurrency must be 1..{MAX_STREAMS} and duration 0..{MAX_SECONDS} s")
    server = None
    if args.model:
        import torch

        from silo.serving.config import ServeConfig
        from silo.serving.server import SiloServer

        torch.set_num_threads(max(1, torch.get_num_threads()))
        server = SiloServer(ServeConfig(model=args.model, store=args.store, host="127.0.0.1", port=0,
                                        max_queue=args.max_queue, max_batch=args.max_batch,
                                        max_tokens_limit=max(512, args.max_tokens)))
        server.start()
        target = server.target
    elif args.target:
        target = loopback_only(args.target)
    else:
        raise SystemExit("give --target or --model")
    print(f"target {target}, {args.duration:.0f} s per level, max_tokens {args.max_tokens}, prompt {args.prompt!r}")
    print(f"{'mode':>10} {'streams':>7} {'ok':>5} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'ttft50':>7} "
          f"{'ttft95':>7}  errors")
    tps = {}
    try:
        for mode in modes:
            args.mode = mode
            for n in levels:
                r = run_level(target, n, args.duration, args)
                tps[(mode, n)] = r["tps"]
                print(f"{mode or 'default':>10} {r['streams']:>7} {r['ok']:>5} {r['rps']:>7.2f} {r['tps']:>7.1f} "
                      f"{r['p50']:>7.2f} {r['p95']:>7.2f} {r['ttft50']:>7.2f} {r['ttft95']:>7.2f}  {r['errors'] or '-'}",
                      flush=True)
        if ("knn", 1) in tps and ("parametric", 1) in tps:
            print(f"kNN{' + attributions' if args.attributions else ''} / parametric tokens/s at 1 stream: "
                  f"{tps[('knn', 1)] / max(tps[('parametric', 1)], 1e-9):.2f}")
        for mode in modes:
            if (mode, 1) in tps and (mode, 8) in tps:
                print(f"{mode or 'default'}: tokens/s at 8 streams / 1 stream: "
                      f"{tps[(mode, 8)] / max(tps[(mode, 1)], 1e-9):.2f}")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
