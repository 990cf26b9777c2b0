"""SiloReplica: one replica of a SILO cluster, a Ray Serve deployment.

Each replica is a SiloServer without ports of its own: its own model copy and engine (continuous
batching) over the shared, memory-mapped store, the HTTP door as its ASGI app (behind Ray Serve's HTTP
proxy) and the silo.v1 services (behind Ray Serve's gRPC proxy: one method per RPC below, plus
grpc.health.v1 Check). The services are the same objects a plain server runs, called through a small
adapter of Ray's gRPC context; their blocking work runs on the replica's own thread pool, so the replica's
event loop stays free, and a client that goes away cancels its generation as on a plain server.

A replica writes nothing: removals, swaps and reloads go to the store controller (`ControllerWriter`),
which rolls each new generation out to every replica (`serve_generation`) before a change counts as done.
A replica opens the store's current generation before it reports ready, follows newer generations on
disk by itself (serve.watch_seconds) and fails its health check when it has served an older generation
than the one on disk for longer than cluster.stale_grace_s — Ray Serve then replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import ray
from ray import serve

from silo.datastore.format import Manifest
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.workflows.removal import probe_served_store

from ..config import ServeConfig
from ..server import AdminService, GenerationService, SiloServer
from ..writer import LocalWriter
from .config import ClusterConfig

log = logging.getLogger("silo.serving.cluster")
UNARY = {"Complete": "gen", "Chat": "gen", "Score": "gen", "Tokenize": "gen", "ModelInfo": "gen",
         "ListShards": "admin", "SwapDatastore": "admin", "ReloadDatastore": "admin",
         "SubmitRemoval": "owner", "GetRemoval": "owner", "GetReceipt": "owner", "ListRemovals": "owner",
         "Lookup": "owner", "GetLedger": "owner"}
STREAMING = {"CompleteStream": "gen", "ChatStream": "gen"}
_END = object()


def _use_threads(n: int) -> None:
    """Compute threads for this replica's model and searches: its share of the node, not all the node's
    cores (replicas side by side on one node would fight over them)."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def remote(ref):
    """ray.get, raising what the controller raised (RpcFailure, ...) rather than Ray's wrapper of it."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else None
        if cause is not None:
            raise cause from None
        raise


class _Aborted(Exception):
    """A handler ended its call with a status (set on Ray's gRPC context before raising)."""


class CallContext:
    """What SILO's gRPC handlers use of a grpc.ServicerContext, over Ray Serve's gRPC context: metadata,
    peer, abort (the status is set on Ray's context, which its proxy sends), liveness and callbacks that
    run when the call ends early (cancellation)."""

    def __init__(self, ray_context):
        self._ctx = ray_context
        self._callbacks: list = []
        self.cancelled = False

    def invocation_metadata(self):
        return list(self._ctx.invocation_metadata()) if self._ctx is not None else []

    def peer(self) -> str:
        return self._ctx.peer() if self._ctx is not None else ""

    def time_remaining(self):
        return None  # Ray's proxy turns a client's deadline into a cancellation

    def is_active(self) -> bool:
        return not self.cancelled

    def add_callback(self, fn) -> bool:
        self._callbacks.append(fn)
        return True

    def abort(self, code, details: str):
        if self._ctx is not None:
            self._ctx.set_code(code)
            self._ctx.set_details(details)
        raise _Aborted(details)

    def cancel(self) -> None:
        self.cancelled = True
        for fn in self._callbacks:
            fn()


class ControllerLedger:
    """The cluster's contribution ledger, kept by the store controller (one writer)."""

    def __init__(self, controller):
        self.controller = controller

    def record(self, request_id, credits, completion_tokens, mode, store_generation=None):
        self.controller.record_credit.remote(request_id, credits, completion_tokens, mode, store_generation)
        return credits

    def totals(self, owner=None):
        return remote(self.controller.ledger_totals.remote(owner))

    def responses(self):
        return remote(self.controller.ledger_responses.remote())

    def close(self):
        pass


class ControllerWriter:
    """A replica's store writer: every change goes to the store controller, which rolls it out to every
    replica (this one included) before answering. Picking up a generation already on disk (the watch, a
    rollout's request) is local."""

    def __init__(self, server: SiloServer, controller):
        self.server, self.controller = server, controller
        engine = server.engine
        self.local = LocalWriter(engine.lm, on_model=lambda fn: engine.control(fn, timeout=600),
                                 store_lock=server.store_lock, on_swap=server.swapped)

    def submit_removal(self, caller, request, verify: bool = True, wait: bool = False):
        return remote(self.controller.submit_removal.remote(caller, request, verify, wait))

    def swap(self, path: str):
        prev = self.server.engine.lm.store
        remote(self.controller.swap.remote(path))
        return prev, self.server.engine.lm.store

    def reload(self, reason: str = "reload"):
        if reason == "watch":
            return self.local.reload(reason)
        prev = self.server.engine.lm.store
        changed = remote(self.controller.reload.remote())
        return None if changed is None else (prev, self.server.engine.lm.store)

    def serve(self, path: str, generation: int) -> Datastore | None:
        """Serve at least `generation` of the store at `path` (a rollout's request)."""
        cur = self.server.engine.lm.store
        if cur is not None and str(cur.path) == path and cur.generation >= generation:
            return cur
        if cur is None or str(cur.path) != path:
            self.local.swap(path)
        else:
            self.local.reload("rollout")
        return self.server.engine.lm.store

    def resume_unfinished(self) -> list[str]:
        return []  # the controller's job

    def finishing(self, request_id: str) -> bool:
        return remote(self.controller.finishing.remote(request_id))

    def wait_background(self, timeout: float | None = None) -> None:
        remote(self.controller.wait_background.remote(timeout))


@serve.ingress()
class SiloReplica:
    def __init__(self, serve_cfg: dict, cluster_cfg: dict):
        cfg = ServeConfig.model_validate(serve_cfg)
        self.cluster = ClusterConfig.model_validate(cluster_cfg)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.controller = ray.get_actor(self.cluster.controller, namespace=self.cluster.namespace)
        _use_threads(cfg.torch_threads or max(1, int(self.cluster.replica_cpus)))
        # the store's current generation on disk is the controller's: it publishes before it rolls out
        lm = SiloLM.load(cfg.model, cfg.store, knn=cfg.resolved_knn(), device=cfg.device, dtype=cfg.dtype)
        self.first_generation = lm.store.generation if lm.store is not None else None
        self.server = SiloServer(cfg, lm=lm, replica=self.replica)
        self.server.load(writer=lambda server: ControllerWriter(server, self.controller))
        if remote(self.controller.has_ledger.remote()):
            self.server.ledger = ControllerLedger(self.controller)
        self.pool = ThreadPoolExecutor(max_workers=cfg.max_queue + cfg.max_batch + 8, thread_name_prefix="silo-call")
        self.services = {"gen": GenerationService(self.server), "admin": AdminService(self.server),
                         "owner": self.server.dataowner}
        self._stale_since: float | None = None
        log.info("replica ready", extra={"fields": {"event": "replica_ready", "replica": self.replica,
                                                     "generation": self.first_generation}})

    def __serve_build_asgi_app__(self):
        from ..http import HttpDoor

        return HttpDoor(self.server).app

    # ------------------------------------------------------------------------------ calls
    async def _unary(self, name: str, request, grpc_context):
        ctx = CallContext(grpc_context)
        handler = getattr(self.services[UNARY[name]], name)
        future = asyncio.wrap_future(self.pool.submit(handler, request, ctx))
        try:
            return await future
        except asyncio.CancelledError:
            ctx.cancel()  # the client went away: stop its generation
            raise

    async def _stream(self, name: str, request, grpc_context):
        ctx = CallContext(grpc_context)
        chunks = getattr(self.services[STREAMING[name]], name)(request, ctx)
        pending = None
        try:
            while True:
                pending = self.pool.submit(next, chunks, _END)
                item = await asyncio.wrap_future(pending)
                if item is _END:
                    return
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            ctx.cancel()
            raise
        finally:
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: self.pool.submit(chunks.close))
            else:
                self.pool.submit(chunks.close)

    async def Check(self, request, grpc_context=None):
        """grpc.health.v1 Check through the gRPC proxy: SERVING while this replica serves the current
        generation."""
        from grpc_health.v1 import health_pb2

        healthy = self.server.engine is not None and self._stale_for() == 0.0
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING if healthy
                                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    # ------------------------------------------------------------------------------ control
    async def serve_generation(self, path: str, generation: int) -> dict:
        """A rollout's request: serve at least `generation`; the acknowledgement names this replica."""
        store = await asyncio.wrap_future(self.pool.submit(self.server.writer.serve, path, generation))
        return {"replica": self.replica, "generation": store.generation if store is not None else None,
                "node": ray.get_runtime_context().get_node_id(), "at": time.time()}

    async def probe_removed(self, removed: list, owner: str | None) -> dict:
        """The removal's retrieval probe on the snapshot this replica serves (on the engine's worker)."""
        lm = self.server.engine.lm
        res = await asyncio.wrap_future(self.pool.submit(
            self.server.engine.control, lambda: probe_served_store(lm, removed, owner), 600))
        return {"replica": self.replica, **res}

    async def generate_here(self, prompt: str, max_tokens: int = 24) -> dict:
        """A greedy kNN completion of `prompt` on this replica (an operator's check of what each replica
        serves): its text, generation and the owners its sentences are attributed to."""
        from silo.model.request import GenerationRequest, OutputControls, RetrievalParams
        from silo.model.sampling import SamplingParams

        req = GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=max_tokens, temperature=0.0),
                                retrieval=RetrievalParams(mode="knn"), output=OutputControls(attributions=True))
        job = self.server.engine.generate(req)
        res = await asyncio.wrap_future(self.pool.submit(job.result, 600))
        return {"replica": self.replica, "text": res.text, "generation": res.store_generation,
                "owners": sorted({s.owner for a in res.attributions for s in a.sources})}

    def info(self) -> dict:
        store = self.server.engine.lm.store
        return {"replica": self.replica, "first_generation": self.first_generation,
                "generation": store.generation if store is not None else None,
                "node": ray.get_runtime_context().get_node_id()}

    def _stale_for(self) -> float:
        """How long this replica has served an older generation than the one on disk (0: it has not)."""
        store = self.server.engine.lm.store
        if store is None or Manifest.read(store.path).generation <= store.generation:
            self._stale_since = None
            return 0.0
        if self._stale_since is None:
            self._stale_since = time.monotonic()
        return time.monotonic() - self._stale_since

    def check_health(self) -> None:
        """Ray Serve's health check: a replica still serving an older generation than the store's after
        cluster.stale_grace_s (its swap failed, say) is unhealthy and gets replaced."""
        if self.server.load_error is not None:
            raise RuntimeError(f"loading failed: {self.server.load_error}")
        stale = self._stale_for()
        if stale > self.cluster.stale_grace_s:
            raise RuntimeError(f"serving generation {self.server.engine.lm.store.generation} for {stale:.0f}s "
                               "after a newer one was published")


def _rpc(name: str, streaming: bool):
    if streaming:
        async def method(self, request, grpc_context=None):
            async for item in self._stream(name, request, grpc_context):
                yield item
    else:
        async def method(self, request, grpc_context=None):
            return await self._unary(name, request, grpc_context)
    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"silo.v1 {name} through Ray Serve's gRPC proxy."
    return method


for _name in UNARY:
    setattr(SiloReplica, _name, _rpc(_name, False))
for _name in STREAMING:
    setattr(SiloReplica, _name, _rpc(_name, True))
