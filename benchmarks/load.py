"""Load test for `silo serve`: N concurrent streaming clients for a fixed duration (not a test).

    python benchmarks/load.py --target 127.0.0.1:50051 --concurrency 1,8,32 --duration 20
    python benchmarks/load.py --model runs/demo/model --store runs/demo/store --modes parametric,knn
    python benchmarks/load.py --http-url http://127.0.0.1:8080 --doors http --concurrency 1,8
    python benchmarks/load.py --model runs/demo/model --store runs/demo/store --doors grpc,http --concurrency 1,8

Each door and mode runs every level in turn against the same server; the summary prints the ratios the
serving engine is judged by: kNN (with attributions) over parametric tokens/s at 1 stream, and each
mode's tokens/s at 8 streams over 1 stream (continuous batching).

With --model the script starts its own server on 127.0.0.1 (gRPC and HTTP on free ports, one engine), in
a child process: the client threads share no interpreter lock with it (--same-process to put it here).
`--doors` picks the front doors to load, one after the other: grpc (silo.v1 CompleteStream) and http (the
OpenAI-compatible /v1/completions with stream=true, through the official openai client). Prints, per door
and concurrency level, requests/s, generated tokens/s, p50/p95 latency, p50/p95 time to first token and
errors by status code.
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


class Level:
    """One concurrency level: `streams` client loops for `duration` seconds, and what they recorded."""

    def __init__(self, streams: int, duration: float):
        self.streams, self.duration = streams, duration
        self.stop_at = time.monotonic() + duration
        self.lock = threading.Lock()
        self.lat, self.ttft, self.errors, self.tokens = [], [], Counter(), 0

    def done(self, t0: float, first: float | None, tokens: int) -> None:
        with self.lock:
            self.tokens += tokens
            self.lat.append(time.monotonic() - t0)
            if first is not None:
                self.ttft.append(first)

    def error(self, name: str) -> None:
        with self.lock:
            self.errors[name] += 1
        time.sleep(0.05)  # back off a little on backpressure instead of spinning

    def run(self, client_loop) -> dict:
        t0 = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(self.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.duration + 120)
        wall = time.monotonic() - t0
        lat, ttft = self.lat, self.ttft
        return dict(streams=self.streams, wall=wall, ok=len(lat), rps=len(lat) / wall, tps=self.tokens / wall,
                    p50=pct(lat, 0.5), p95=pct(lat, 0.95), ttft50=pct(ttft, 0.5), ttft95=pct(ttft, 0.95),
                    errors=dict(self.errors))


def run_level(target: str, streams: int, duration: float, args) -> dict:
    level = Level(streams, duration)

    def client_loop(i: int) -> None:
        with SiloClient(target, timeout=duration + 60) as c:
            n = 0
            while time.monotonic() < level.stop_at:
                t0 = time.monotonic()
                first = None
                try:
                    for piece in c.complete_stream(args.prompt, max_tokens=args.max_tokens, seed=i * 100000 + n,
                                                   temperature=args.temperature, mode=args.mode or None,
                                                   return_attributions=args.attributions):
                        if first is None and isinstance(piece, str):
                            first = time.monotonic() - t0
                        if isinstance(piece, pb.CompleteResponse):
                            level.done(t0, first, piece.usage.completion_tokens)
                except grpc.RpcError as exc:
                    level.error(exc.code().name)
                n += 1

    return level.run(client_loop)


def run_level_http(url: str, streams: int, duration: float, args) -> dict:
    """The same loop through the HTTP door: OpenAI streaming completions, usage from the last chunk."""
    import openai

    level = Level(streams, duration)
    model = openai.OpenAI(base_url=url + "/v1", api_key="load", max_retries=0).models.list().data[0].id
    extra = ({"mode": args.mode} if args.mode else {}) | {"return_attributions": args.attributions}

    def client_loop(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="load", max_retries=0, timeout=duration + 60)
        n = 0
        while time.monotonic() < level.stop_at:
            t0 = time.monotonic()
            first = None
            try:
                for chunk in client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens,
                                                       seed=i * 100000 + n, temperature=args.temperature, stream=True,
                                                       stream_options={"include_usage": True}, extra_body=extra):
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.monotonic() - t0
                    if chunk.usage is not None:
                        level.done(t0, first, chunk.usage.completion_tokens)
            except openai.APIStatusError as exc:
                level.error(f"HTTP {exc.status_code}")
            except openai.APIConnectionError:
                level.error("connection")
            n += 1

    return level.run(client_loop)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="host:port of a running server (loopback only)")
    ap.add_argument("--http-url", help="base URL of a running server's HTTP door, e.g. http://127.0.0.1:8080 "
                                        "(loopback only)")
    ap.add_argument("--doors", default="grpc", help="comma-separated: grpc, http (default: %(default)s)")
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
    ap.add_argument("--same-process", action="store_true",
                    help="run the started server in this process (by default it gets a process of its own, so the "
                         "client threads do not compete with it for the interpreter)")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m] or [""]
    levels = [int(x) for x in args.concurrency.split(",")]
    doors = [d.strip() for d in args.doors.split(",") if d.strip()]
    if not doors or set(doors) - {"grpc", "http"}:
        raise SystemExit(f"--doors: grpc and/or http (got {args.doors!r})")
    if any(not 1 <= n <= MAX_STREAMS for n in levels) or not 0 < args.duration <= MAX_SECONDS:
        raise SystemExit(f"concurrency must be 1..{MAX_STREAMS} and duration 0..{MAX_SECONDS} s")
    server, target, url = _server_of(args, doors)
    print(f"grpc {target or '-'}, http {url or '-'}, {args.duration:.0f} s per level, max_tokens {args.max_tokens}, "
          f"prompt {args.prompt!r}")
    print(f"{'door':>5} {'mode':>10} {'streams':>7} {'ok':>5} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} "
          f"{'ttft50':>7} {'ttft95':>7}  errors")
    try:
        tps = _run_levels(args, doors, modes, levels, target, url)
        _print_ratios(tps, doors, modes, args.attributions)
    finally:
        if server is not None:
            server.stop()
    return 0


def _server_of(args, doors: list[str]):
    """(server started here or None, gRPC target, HTTP url): a server started with --model, or the running
    one the flags name (loopback only)."""
    server = None
    if args.model:
        cfg = dict(model=args.model, store=args.store, host="127.0.0.1", port=0,
                   http_port=0 if "http" in doors else None, max_batch=args.max_batch, max_queue=args.max_queue,
                   max_tokens_limit=max(512, args.max_tokens))
        server, target, url = start_server(cfg, args.same_process)
    elif args.target or args.http_url:
        target = loopback_only(args.target) if args.target else None
        url = args.http_url.rstrip("/") if args.http_url else None
        if url:
            loopback_only(url.split("://", 1)[-1].split("/", 1)[0])
    else:
        raise SystemExit("give --target / --http-url, or --model")
    if "grpc" in doors and not target or "http" in doors and not url:
        raise SystemExit("--doors grpc needs --target (or --model); --doors http needs --http-url (or --model)")
    return server, target, url


def _run_levels(args, doors: list[str], modes: list[str], levels: list[int], target, url) -> dict:
    """Every door x mode x concurrency level, a table row each; returns {(door, mode, streams): tokens/s}."""
    tps = {}
    for door in doors:
        for mode in modes:
            args.mode = mode
            for n in levels:
                r = run_level(target, n, args.duration, args) if door == "grpc" else \
                    run_level_http(url, n, args.duration, args)
                tps[(door, mode, n)] = r["tps"]
                print(f"{door:>5} {mode or 'default':>10} {r['streams']:>7} {r['ok']:>5} {r['rps']:>7.2f} "
                      f"{r['tps']:>7.1f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['ttft50']:>7.2f} {r['ttft95']:>7.2f}  "
                      f"{r['errors'] or '-'}", flush=True)
    return tps


def _print_ratios(tps: dict, doors: list[str], modes: list[str], attributions: bool) -> None:
    """kNN over parametric at 1 stream, and 8 streams over 1, per door."""
    for door in doors:
        if (door, "knn", 1) in tps and (door, "parametric", 1) in tps:
            print(f"{door}: kNN{' + attributions' if attributions else ''} / parametric tokens/s at 1 stream: "
                  f"{tps[(door, 'knn', 1)] / max(tps[(door, 'parametric', 1)], 1e-9):.2f}")
        for mode in modes:
            if (door, mode, 1) in tps and (door, mode, 8) in tps:
                print(f"{door}: {mode or 'default'} tokens/s at 8 streams / 1 stream: "
                      f"{tps[(door, mode, 8)] / max(tps[(door, mode, 1)], 1e-9):.2f}")


def _start(cfg: dict):
    """(server, gRPC target, HTTP url) of a server started here with the settings `cfg`."""
    from silo.serving.config import ServeConfig
    from silo.serving.server import SiloServer

    server = SiloServer(ServeConfig(**cfg)).start()
    return server, server.target, server.http.url if server.http else None


def _serve_child(cfg: dict, conn, stop) -> None:
    """The started server, in a process of its own: (target, http url) or an error through `conn`."""
    try:
        server, target, url = _start(cfg)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which exits with it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", (target, url)))
    stop.wait()
    server.stop()


class ChildServer:
    """A server in a child process: the load's client threads must not share its interpreter (its GIL),
    as they would not in a deployment."""

    def __init__(self, cfg: dict):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        here, there = ctx.Pipe()
        self.stop_event = ctx.Event()
        self.proc = ctx.Process(target=_serve_child, args=(cfg, there, self.stop_event), daemon=True)
        self.proc.start()
        if not here.poll(600):
            self.stop()
            raise SystemExit("the server did not start within 600 s")
        status, value = here.recv()
        if status != "ok":
            self.stop()
            raise SystemExit(f"the server failed to start: {value}")
        self.target, self.url = value

    def stop(self) -> None:
        self.stop_event.set()
        self.proc.join(60)
        if self.proc.is_alive():
            self.proc.kill()


def start_server(cfg: dict, same_process: bool = False):
    """(server, gRPC target, HTTP url) of a server started for the load, in a child process by default."""
    if same_process:
        return _start(cfg)
    child = ChildServer(cfg)
    return child, child.target, child.url


if __name__ == "__main__":
    sys.exit(main())
