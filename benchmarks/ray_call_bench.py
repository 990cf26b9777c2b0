"""What one Ray actor call costs on this machine (not a test): the budget a sharded store's fan-out spends
per decoding step (docs/scale.md).

    .venv/bin/python benchmarks/ray_call_bench.py [--calls 500]

On a local two-node Ray cluster (this machine), a shard actor answers a decoding step's search request:
8 query vectors in (8 x 256 float32, 8 KB), 8 x 1,024 neighbours out (distances float32 and ids int64,
96 KB). Prints p50/p95 of the round trip to an actor on the caller's node and on the other node, one call
at a time and 4 actors in parallel (one fan-out), against the same function called in-process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import ray

from silo.serving.cluster.local import LocalRayCluster


@ray.remote(num_cpus=0)
class Shard:
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(queries)
        return np.zeros((n, k), np.float32), np.zeros((n, k), np.int64)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def timed(fn, calls: int) -> tuple[float, float]:
    fn()  # warm-up
    xs = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        xs.append((time.perf_counter() - t) * 1e3)
    xs.sort()
    return statistics.median(xs), xs[int(0.95 * (len(xs) - 1))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args(argv)
    q = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    with LocalRayCluster(nodes=2, cpus=1) as address:
        ray.init(address=address, log_to_driver=False)
        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        other = next(n for n in nodes if n != here)
        pin = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy
        local = Shard.options(scheduling_strategy=pin(here, soft=False)).remote()
        remote = Shard.options(scheduling_strategy=pin(other, soft=False)).remote()
        fanout = [Shard.options(scheduling_strategy=pin(nodes[i % 2], soft=False)).remote() for i in range(4)]
        ray.get([a.node.remote() for a in (local, remote, *fanout)])
        plain = Shard.__ray_metadata__.modified_class()  # the same class, in this process
        rows = {"in-process call": timed(lambda: plain.search(q, 1024), args.calls),
                "actor on this node": timed(lambda: ray.get(local.search.remote(q, 1024)), args.calls),
                "actor on the other node": timed(lambda: ray.get(remote.search.remote(q, 1024)), args.calls),
                "fan-out to 4 actors (2 per node)": timed(
                    lambda: ray.get([a.search.remote(q, 1024) for a in fanout]), args.calls)}
    print("| call (8 queries in, 8 x 1,024 neighbours out) | p50 ms | p95 ms |\n|---|---|---|")
    for name, (p50, p95) in rows.items():
        print(f"| {name} | {p50:.3f} | {p95:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
