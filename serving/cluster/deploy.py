"""Start SILO on a Ray cluster: the store controller, Ray Serve's proxies and the replicas.

    handle = serve_on_ray(serve_cfg, cluster_cfg, address="auto")   # returns once every replica is ready
    handle.wait()                                                    # until SIGTERM/SIGINT (silo serve --ray)
    handle.stop()                                                    # the app, the proxies' routes, the controller

One gRPC endpoint (Ray Serve's gRPC proxy on serve.port: silo.v1 and grpc.health.v1 Check) and one HTTP
endpoint (Ray Serve's HTTP proxy on serve.http_port: the OpenAI-compatible API and the owners' page),
on the head node by default (cluster.proxy_location).
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import gRPCOptions, HTTPOptions, ProxyLocation

from silo.core.config import ConfigError

from ..config import ServeConfig
from .config import PROXY_ENV, ClusterConfig
from .controller import REPLICA_DEPLOYMENT, StoreController, replica_actor_names

log = logging.getLogger("silo.serving.cluster")
GRPC_SERVICERS = ["silo.serving.gen.silo_pb2_grpc.add_GenerationServicer_to_server",
                  "silo.serving.gen.silo_pb2_grpc.add_AdminServicer_to_server",
                  "silo.serving.gen.silo_pb2_grpc.add_DataOwnerServicer_to_server",
                  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]
DEFAULT_HTTP_PORT = 8000


def check_servable(cfg: ServeConfig) -> None:
    """What a plain server supports and a cluster does not (yet), refused with the field's name."""
    if cfg.tls_cert or cfg.tls_key:
        raise ConfigError("serve.tls_cert/tls_key: TLS is not terminated by SILO's Ray deployment; put a "
                          "TLS-terminating balancer in front of Ray Serve's proxies, or serve without --ray")
    if cfg.store is None:
        raise ConfigError("serve.store: a cluster serves a store (its controller is the store's writer)")


@dataclass
class ClusterHandle:
    cfg: ServeConfig
    cluster: ClusterConfig
    controller: object

    @property
    def grpc_target(self) -> str:
        return f"{_client_host(self.cfg.host)}:{self.cfg.port}"

    @property
    def http_url(self) -> str:
        return f"http://{_client_host(self.cfg.http_host or self.cfg.host)}:{self.cfg.http_port or DEFAULT_HTTP_PORT}"

    def replicas(self) -> dict:
        return replica_actor_names(self.cluster.app)

    def broadcast(self, method: str, *args, timeout: float = 120.0) -> list:
        """Call `method` on every replica (tests, operators' checks)."""
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=self.cluster.app)
        return handle.broadcast(method, *args).results(timeout_s=timeout, return_exceptions=True)

    def wait(self) -> None:
        done = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: done.set())
        while not done.wait(0.5):
            pass

    def stop(self) -> None:
        """Delete the app (replicas drain for their graceful shutdown time) and the controller."""
        try:
            ray.get(self.controller.wait_background.remote(120))
        finally:
            serve.delete(self.cluster.app)
            ray.kill(self.controller)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host


def serve_on_ray(cfg: ServeConfig, cluster: ClusterConfig, address: str | None = "auto") -> ClusterHandle:
    """Deploy SILO on the Ray cluster at `address` ("auto": the one this node belongs to) and return once
    every replica serves (see the module docstring)."""
    from .replica import SiloReplica

    check_servable(cfg)
    ray.init(address=address, namespace=cluster.namespace, ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": dict(PROXY_ENV)})
    controller = ray.remote(StoreController).options(
        name=cluster.controller, namespace=cluster.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_concurrency=16).remote(cfg.model_dump(), cluster.model_dump())
    state = ray.get(controller.ready.remote())
    log.info("store controller ready", extra={"fields": {"event": "controller_ready", **state}})
    serve.start(proxy_location=ProxyLocation(cluster.proxy_location),
                http_options=HTTPOptions(host=cfg.http_host or cfg.host, port=cfg.http_port or DEFAULT_HTTP_PORT),
                grpc_options=gRPCOptions(port=cfg.port, grpc_servicer_functions=GRPC_SERVICERS))
    options = cluster.deployment_options(max_ongoing=cfg.max_queue + cfg.max_batch)
    app = serve.deployment(SiloReplica, name=REPLICA_DEPLOYMENT, **options).bind(cfg.model_dump(), cluster.model_dump())
    serve.run(app, name=cluster.app, route_prefix="/", blocking=False)
    ray.get(controller.set_deployed.remote(True))
    handle = ClusterHandle(cfg, cluster, controller)
    log.info("serving", extra={"fields": {"event": "cluster_serving", "grpc": handle.grpc_target,
                                           "http": handle.http_url, "replicas": sorted(handle.replicas())}})
    return handle
