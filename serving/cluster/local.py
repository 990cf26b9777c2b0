"""A Ray cluster of several nodes on this machine, for tests, benchmarks and trying `silo serve --ray`:

    with LocalRayCluster(nodes=2, cpus=1) as address:      # `ray start --head` + `ray start --address ...`
        handle = serve_on_ray(cfg, cluster_cfg, address)

Each node runs `ray start --block` in a process group of its own, so stopping the cluster stops its
processes and no other Ray cluster on the machine (`ray stop` would stop every one). Real clusters are
started with `ray start` on each machine (README: "Replicas on a Ray cluster").
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
import shutil

from .config import PROXY_ENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    def __init__(self, nodes: int = 2, cpus: float = 1, timeout: float = 180.0):
        self.nodes, self.cpus, self.timeout = nodes, cpus, timeout
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="silo-ray-", dir="/tmp")  # short: Ray's socket paths are bounded
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **PROXY_ENV}
        self.address = f"127.0.0.1:{free_port()}"

    def _node(self, args: list[str]) -> None:
        ray_bin = Path(sys.executable).parent / "ray"
        self.procs.append(subprocess.Popen(
            [str(ray_bin), "start", "--block", "--num-cpus", str(self.cpus), "--disable-usage-stats", *args],
            env=self.env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def start(self) -> str:
        port = self.address.rsplit(":", 1)[1]
        self._node(["--head", "--port", port, "--include-dashboard=false", "--temp-dir", self.tmp])
        self.wait_nodes(1)
        for _ in range(self.nodes - 1):
            self._node(["--address", self.address])
        self.wait_nodes(self.nodes)
        return self.address

    def wait_nodes(self, n: int) -> None:
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(1 for x in ray.nodes() if x['Alive']))")
        end = time.monotonic() + self.timeout
        while time.monotonic() < end:
            out = subprocess.run([sys.executable, "-c", probe, self.address], env=self.env, capture_output=True,
                                 text=True)
            if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
                return
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Ray node of the local cluster at {self.address} exited")
            time.sleep(1)
        raise TimeoutError(f"the local Ray cluster at {self.address} did not reach {n} node(s) in {self.timeout:.0f}s")

    def stop(self) -> None:
        try:
            import ray

            ray.shutdown()
        except ImportError:
            pass
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
