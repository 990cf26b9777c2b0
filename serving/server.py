"""The gRPC server: silo.v1 Generation and Admin, grpc.health.v1, reflection, metrics, draining.

    server = SiloServer(cfg).start()      # binds (port 0 = free port), health NOT_SERVING, loads the model
    server.wait_ready()                   # health SERVING once the model and store are loaded
    ...
    server.drain()                        # health NOT_SERVING, refuse new work, finish in-flight, stop

Handlers only validate, enqueue on the Engine (serving/engine.py) and convert results; every handler
runs inside `_handled`, which counts, times and logs the call and turns exceptions into status codes
(nothing a client sends can take the server down: unknown failures become INTERNAL plus a log line).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from silo.datastore.format import Manifest
from silo.model.lm import SiloLM
from silo.model.output_policy import disclosed

from .auth import FailedAttempts, check_generation_access, is_admin, peer_host, require_admin, viewer
from .config import OwnerTokens, ServeConfig
from .dataowner import DataOwnerService
from .engine import Engine, GenResult
from .gen import silo_pb2 as pb
from .gen import silo_pb2_grpc as pb_grpc
from .ledger import Ledger, credits_of
from .messages import completion_message, finite, knn_defaults, logprob_messages, store_message
from .writer import LocalWriter
from .metrics import Metrics
from .requests import MAX_CHARS_PER_TOKEN, Limits, chat_request, complete_request, score_request
from .rpc import RpcFailure, _handled

log = logging.getLogger("silo.serving")
SERVICES = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Generation", "Admin", "DataOwner")]
Code = grpc.StatusCode


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, server: SiloServer):
        self.server = server

    def _engine(self) -> Engine:
        if self.server.engine is None:
            raise RpcFailure(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.server.engine

    @contextmanager
    def _slot(self):
        """One of the data plane's slots for this call, or RESOURCE_EXHAUSTED at once: generation calls
        beyond what the engine can hold never take the threads kept for health, admin and data owners."""
        if not self.server.data_plane.acquire(blocking=False):
            raise RpcFailure(Code.RESOURCE_EXHAUSTED, "server busy: every generation slot is taken; retry shortly")
        try:
            yield
        finally:
            self.server.data_plane.release()

    def _client(self, context) -> str:
        """Who asks, for generation access and fair queueing: a token's name, else the peer's address."""
        peer = peer_host(context.peer())
        name = check_generation_access(self.server, authorization(context), peer)
        return name or peer

    def _run(self, req, context, info):
        """Enqueue a generation tied to this call: its deadline, and cancellation when the call ends."""
        engine = self._engine()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        req, client = req
        job = engine.generate(req, deadline, client)
        if not context.add_callback(lambda: engine.cancel(job)):
            engine.cancel(job)  # the call already ended
        info.update(request_id=job.id, mode=req.retrieval.mode, max_tokens=req.sampling.max_new_tokens)
        return job

    def _request(self, convert, request, context):
        """(the call's GenerationRequest, its client), once the caller may generate (`convert`: the wire's
        converter)."""
        client = self._client(context)
        self._engine()
        return convert(request, self.server.limits()), client

    def _done(self, res: GenResult, job, info, context) -> pb.CompleteResponse:
        info.update(finish_reason=res.finish_reason, prompt_tokens=res.prompt_tokens,
                    completion_tokens=res.completion_tokens)
        who = viewer(self.server, authorization(context))  # supporting text within its documents' caps
        res = replace(res, attributions=disclosed(res.attributions, job.request.output.policy(self._engine().policy),
                                                  who.role, who.name))
        if res.finish_reason == "cancelled" and job.deadline is not None and time.monotonic() >= job.deadline:
            # stopped by the deadline: say so, rather than racing the client's own timer with an OK
            raise RpcFailure(Code.DEADLINE_EXCEEDED, f"deadline exceeded after {res.completion_tokens} tokens")
        return completion_message(res, job.id)

    def _stream(self, req, context, info):
        job = self._run(req, context, info)
        for kind, value in job.stream():
            if kind == "delta":
                yield pb.CompleteChunk(delta=value, logprobs=logprob_messages(getattr(value, "logprobs", ())))
            elif kind == "done":  # (an echoed prompt's event: its log-probs come with `done`)
                yield pb.CompleteChunk(done=self._done(value, job, info, context))

    @_handled("Complete")
    def Complete(self, request, context, info):
        with self._slot():
            job = self._run(self._request(complete_request, request, context), context, info)
            return self._done(job.result(), job, info, context)

    @_handled("CompleteStream", streaming=True)
    def CompleteStream(self, request, context, info):
        with self._slot():
            yield from self._stream(self._request(complete_request, request, context), context, info)

    @_handled("Chat")
    def Chat(self, request, context, info):
        with self._slot():
            job = self._run(self._request(chat_request, request, context), context, info)
            return self._done(job.result(), job, info, context)

    @_handled("ChatStream", streaming=True)
    def ChatStream(self, request, context, info):
        with self._slot():
            yield from self._stream(self._request(chat_request, request, context), context, info)

    @_handled("Score")
    def Score(self, request, context, info):
        with self._slot():
            return self._score(request, context, info)

    def _score(self, request, context, info):
        client = self._client(context)
        req = score_request(request, self.server.limits())
        remaining = context.time_remaining()
        job = self._engine().score(req, time.monotonic() + remaining if remaining is not None else None, client)
        out = job.result()
        res = out.result
        info.update(request_id=job.id, mode=req.mode, tokens=res.num_tokens)
        msg = pb.ScoreResponse(perplexity=res.perplexity, perplexity_parametric=res.perplexity_parametric,
                               mode=res.mode,
                               tokens=[pb.TokenScore(id=t, text=x, logprob_parametric=finite(float(lp)),
                                                     logprob=finite(float(lq)), lmbda=float(lam))
                                       for t, x, lp, lq, lam in zip(res.tokens, out.token_texts, res.logp_parametric,
                                                                    res.logp, _lambdas(res))])
        if res.store_generation is not None:
            msg.store_generation = res.store_generation
        return msg

    @_handled("Tokenize")
    def Tokenize(self, request, context, info):
        with self._slot():
            client = self._client(context)
            limit = self.server.cfg.max_prompt_chars  # bounded before it reaches the engine's worker
            if len(request.text) > limit:
                raise RpcFailure(Code.INVALID_ARGUMENT, f"text: {len(request.text)} characters; at most {limit}")
            ids, tokens = self._engine().tokenize(request.text, client).result()
            info["tokens"] = len(ids)
            return pb.TokenizeResponse(ids=ids, tokens=tokens)

    @_handled("ModelInfo")
    def ModelInfo(self, request, context, info):
        check_generation_access(self.server, authorization(context), peer_host(context.peer()))
        lm = self._engine().lm
        cfg = self.server.cfg
        admin = is_admin(self.server, authorization(context))  # server paths are the operator's business only
        msg = pb.ModelInfoResponse(
            model_name=Path(cfg.model).name, model_path=cfg.model if admin else "", fingerprint=lm.fingerprint,
            context_length=lm.context_length, vocab_size=lm.vocab_size, training_policy=self.server.policy,
            knn=knn_defaults(lm), modes=lm.modes(),
            max_tokens_default=cfg.max_tokens, max_tokens_limit=cfg.max_tokens_limit)
        if lm.store is not None:  # which shards and owners: the operator's business too (counts for others)
            msg.store.CopyFrom(store_message(lm.store, show_path=admin, show_shards=admin))
        return msg


def _lambdas(res):
    """The kNN weight at each scored position (0 everywhere outside kNN-LM)."""
    return res.lmbda if res.lmbda is not None else [0.0] * len(res.logp)


class AdminService(pb_grpc.AdminServicer):
    def __init__(self, server: SiloServer):
        self.server = server

    def _authorize(self, context) -> Engine:
        require_admin(self.server, authorization(context), peer_host(context.peer()))
        if self.server.engine is None:
            raise RpcFailure(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.server.engine

    @_handled("ListShards")
    def ListShards(self, request, context, info):
        engine = self._authorize(context)
        if engine.lm.store is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "no datastore is attached")
        return store_message(engine.lm.store)

    @_handled("SwapDatastore")
    def SwapDatastore(self, request, context, info):
        self._authorize(context)
        if not request.path:
            raise RpcFailure(Code.INVALID_ARGUMENT, "path: must not be empty")
        # opened and validated off the worker, swapped between two requests on it; an older generation of
        # the store in use is refused (FAILED_PRECONDITION)
        prev, new = self.server.writer.swap(request.path)
        return self._changed(prev, new, info)

    @_handled("ReloadDatastore")
    def ReloadDatastore(self, request, context, info):
        engine = self._authorize(context)
        cur = engine.lm.store
        if cur is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "no datastore is attached; use SwapDatastore")
        change = self.server.writer.reload()
        if change is None:
            return pb.DatastoreChange(changed=False, previous=store_message(cur), current=store_message(cur))
        return self._changed(*change, info)

    def _changed(self, prev, new, info) -> pb.DatastoreChange:
        info.update(store=str(new.path), generation=new.generation)
        return pb.DatastoreChange(changed=True, previous=store_message(prev), current=store_message(new))


# ----------------------------------------------------------------------------------------- server

class SiloServer:
    def __init__(self, cfg: ServeConfig, lm: SiloLM | None = None, replica: str = ""):
        """`replica`: this server's name among a cluster's replicas (it starts every request id)."""
        self.cfg = cfg
        self.replica = replica
        self._lm = lm  # an already loaded SiloLM (tests, embedding); else loaded from cfg in start()
        self.metrics = Metrics()
        self.store_lock = threading.Lock()  # store changes (swap, reload, removal) one at a time
        self.ledger: Ledger | None = None  # the contribution ledger (serve.ledger), opened in _load
        self.engine: Engine | None = None
        self.writer = None  # who changes the store (serving/writer.py); made in _load, once the engine exists
        self.admin_token = cfg.resolved_admin_token()
        self._owner_tokens = OwnerTokens(cfg)  # checked now: a bad tokens file stops the start, naming it
        self.auth_failures = FailedAttempts(cfg.auth_failures_per_minute, cfg.auth_lockout_seconds)
        self.policy = ""
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http = None  # the HTTP door (serving/http), when serve.http_port is set
        self.load_error: BaseException | None = None
        self._ready = threading.Event()
        self.draining = threading.Event()  # set once drain() refuses new calls
        self._stop_watch = threading.Event()
        self.health = health.HealthServicer(experimental_non_blocking=True,
                                            experimental_thread_pool=futures.ThreadPoolExecutor(max_workers=1))
        # a thread for every generation the engine can hold (queued or in the batch), which `data_plane` bounds,
        # plus control_threads that generation calls never take: health, admin and data owners always find
        # one. Beyond maximum_concurrent_rpcs gRPC itself answers RESOURCE_EXHAUSTED. No SO_REUSEPORT: a second
        # process cannot bind the same port and take part of the calls
        data = cfg.max_queue + cfg.max_batch
        self.data_plane = threading.BoundedSemaphore(data)
        workers = data + cfg.control_threads
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="silo-rpc"),
                                maximum_concurrent_rpcs=workers * 2, options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GenerationServicer_to_server(GenerationService(self), self.grpc)
        pb_grpc.add_AdminServicer_to_server(AdminService(self), self.grpc)
        self.dataowner = DataOwnerService(self)
        pb_grpc.add_DataOwnerServicer_to_server(self.dataowner, self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection([*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def _set_health(self, status) -> None:
        for name in ("", *SERVICES):
            self.health.set(name, status)

    def owner_tokens(self) -> dict[str, str]:
        """owner -> token (or sha256:<hex>), as configured now."""
        return self._owner_tokens.current()

    def swapped(self, prev, new, reason: str) -> None:
        """Account for a snapshot swap: the generation gauge and a log line."""
        self.metrics.store_generation.set(new.generation)
        log.info("datastore swapped", extra={"fields": {"event": "store_swap", "reason": reason, "store": str(new.path),
                                                         "generation": new.generation,
                                                         "previous": str(prev.path) if prev else None,
                                                         "previous_generation": prev.generation if prev else None}})

    def _watch_store(self) -> None:
        """Poll the store's manifest every `serve.watch_seconds` and serve a newer generation another process
        published on the same folder (a removal through another server over shared storage). A newer
        generation is served within watch_seconds plus the time to open the shards that changed."""
        every = self.cfg.watch_seconds
        while not self._stop_watch.wait(every):
            engine = self.engine
            store = engine.lm.store if engine is not None else None
            if store is None:
                continue
            try:
                if Manifest.read(store.path).generation > store.generation:
                    self.writer.reload("watch")
            except Exception:  # noqa: BLE001 - keep watching; the next poll retries
                log.exception("watching %s for newer generations failed", store.path)

    def limits(self) -> Limits:
        lm = self.engine.lm
        return Limits(max_tokens_default=self.cfg.max_tokens, max_tokens_limit=self.cfg.max_tokens_limit,
                      max_stop_sequences=self.cfg.max_stop_sequences, vocab_size=lm.vocab_size,
                      max_prompt_chars=self.cfg.max_prompt_chars, max_messages=self.cfg.max_messages,
                      max_logprobs=self.cfg.max_logprobs, modes=tuple(lm.modes()),
                      max_score_chars=self.cfg.max_score_tokens * MAX_CHARS_PER_TOKEN)

    @property
    def target(self) -> str:
        host = self.cfg.host if self.cfg.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        return f"{host}:{self.port}"

    def start(self, background_load: bool = False) -> SiloServer:
        """Bind and start serving health (NOT_SERVING); load the model (in a thread if background_load)."""
        addr = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.tls_cert:
                creds = grpc.ssl_server_credentials([(Path(self.cfg.tls_key).read_bytes(),
                                                      Path(self.cfg.tls_cert).read_bytes())])
                self.port = self.grpc.add_secure_port(addr, creds)
            else:
                self.port = self.grpc.add_insecure_port(addr)
        except RuntimeError:  # grpc >= 1.60 raises where older versions returned 0
            self.port = 0
        if not self.port:
            raise OSError(f"could not bind {addr} (serve.host/serve.port): is another server on that port?")
        if not self.cfg.tls_cert and not _is_loopback(self.cfg.host):
            log.warning("serving on %s without TLS: bearer tokens (admin, data owners) travel in clear; "
                        "set serve.tls_cert and serve.tls_key", addr,
                        extra={"fields": {"event": "insecure_bind", "host": self.cfg.host}})
        self.grpc.start()
        if self.cfg.http_port is not None:
            from .http import HttpDoor  # the OpenAI-compatible API and the owner page, on this server's engine

            try:
                self.http = HttpDoor(self).start()
            except BaseException:
                self.grpc.stop(0)  # one config, both doors: never leave half of it serving
                raise
        if self.cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
        log.info("listening", extra={"fields": {"event": "listening", "target": addr, "port": self.port,
                                                 "tls": bool(self.cfg.tls_cert), "metrics_port": self.metrics_port,
                                                 "admin": self.admin_token is not None}})
        loader = threading.Thread(target=self._load, name="silo-load", daemon=True)
        loader.start()
        if not background_load:
            # on a thread that ends here rather than on the caller's: a thread that ran parallel torch or FAISS
            # work keeps its OpenMP team, and with two teams on the host's cores GNU OpenMP stops spinning
            # between parallel regions, so every small op of the engine's worker waits for its team to wake
            # (measured: 2.3x slower decoding steps with the model loaded on the calling thread)
            loader.join()
            if self.load_error is not None:
                raise self.load_error
        return self

    def _load(self) -> None:
        try:
            self.load()
        except BaseException as exc:
            self.load_error = exc
            log.error("loading failed", exc_info=exc)
        finally:
            self._ready.set()

    def load(self, writer: Callable[["SiloServer"], Any] | None = None) -> None:
        """Load the model (unless one was given), open the ledger, start the engine and the store's writer,
        finish removals a previous process left unfinished, then report SERVING. `writer(server)` makes
        another writer than this process's own (a cluster replica hands every change to the controller,
        which also keeps the ledger)."""
        t0 = time.monotonic()
        lm = self._lm or SiloLM.load(self.cfg.model, self.cfg.store, knn=self.cfg.resolved_knn(),
                                     device=self.cfg.device, dtype=self.cfg.dtype)
        self.policy = training_policy(self.cfg.model)
        if self.cfg.ledger and writer is None:
            self.ledger = Ledger(self.cfg.ledger)
            if lm.store is not None:
                self.dataowner.sync_ledger(lm.store.path)
        self.engine = Engine(lm, max_queue=self.cfg.max_queue, max_batch=self.cfg.max_batch, metrics=self.metrics,
                             max_score_tokens=self.cfg.max_score_tokens,
                             policy=self.cfg.resolved_output_policy(), on_result=self.record_credit,
                             id_prefix=f"{self.replica}-" if self.replica else "",
                             max_queue_per_client=self.cfg.max_queue_per_client)
        engine = self.engine
        self.writer = writer(self) if writer is not None else LocalWriter(
            lm, on_model=lambda fn: engine.control(fn, timeout=600), store_lock=self.store_lock, ledger=self.ledger,
            on_swap=self.swapped)
        resumed = self.writer.resume_unfinished()  # removals a previous process left unfinished
        if lm.store is not None:
            self.metrics.store_generation.set(lm.store.generation)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if resumed:
            log.info("finished removals left unfinished", extra={"fields": {"event": "resumed", "requests": resumed}})
        if lm.store is not None and self.cfg.watch_seconds:
            threading.Thread(target=self._watch_store, name="silo-store-watch", daemon=True).start()
        log.info("ready", extra={"fields": {"event": "ready", "load_s": round(time.monotonic() - t0, 2),
                                             "model": self.cfg.model, "store": self.cfg.store}})

    def record_credit(self, request_id: str, res: GenResult) -> None:
        """The engine's hook for each finished generation: credit its owners in the ledger and metrics."""
        credits = credits_of(res.attributions)
        if self.ledger is not None:
            credits = self.ledger.record(request_id, credits, res.completion_tokens, res.mode, res.store_generation)
        for owner, tokens in credits.items():
            self.metrics.owner_tokens.labels(owner).inc(tokens)
            self.metrics.owner_share.labels(owner).inc(tokens / max(1, res.completion_tokens))
            self.metrics.owner_responses.labels(owner).inc()

    def wait_ready(self, timeout: float | None = None) -> SiloServer:
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the server did not finish loading within {timeout}s")
        if self.load_error is not None:
            raise self.load_error
        return self

    def drain(self, grace: float | None = None) -> bool:
        """Graceful stop: NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s, stop.

        Returns True if everything in flight finished within the grace period.
        """
        grace = self.cfg.grace_seconds if grace is None else grace
        self._stop_watch.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        t0 = time.monotonic()
        if self.http is not None:
            self.http.close_intake()  # new HTTP requests get 503; those in flight finish below
        stopped = self.grpc.stop(grace)  # new RPCs are refused now; in-flight ones get `grace` seconds
        self.draining.set()
        # removals being compacted/verified finish first (they need the engine); one still running after
        # the grace period is cut off with the process and resumed by the next start (crash-safe)
        self.dataowner.wait_background(grace)
        clean = self.engine.drain(grace) if self.engine is not None else True
        stopped.wait(grace + 1.0)
        if self.http is not None:
            self.http.stop(grace)
        if self.engine is not None:
            self.engine.stop()
        if self.ledger is not None:
            self.ledger.close()
        self.metrics.close()
        log.info("stopped", extra={"fields": {"event": "stopped", "clean": clean,
                                               "drain_s": round(time.monotonic() - t0, 2)}})
        return clean

    def stop(self) -> None:
        self.drain(0.0)


def training_policy(model: str) -> str:
    """The licence policy the model's weights were trained under (its provenance.json), or ""."""
    import json

    prov = Path(model) / "provenance.json"
    if not prov.is_file():
        return ""
    return json.loads(prov.read_text(encoding="utf-8")).get("policy", {}).get("name", "")


def authorization(context) -> str | None:
    """The call's `authorization` metadata."""
    return dict(context.invocation_metadata()).get("authorization")


def _is_loopback(host: str) -> bool:
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    return all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos) and bool(infos)


def serve_forever(cfg: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain within cfg.grace_seconds. Returns an exit status."""
    import signal

    server = SiloServer(cfg)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    server.start(background_load=True)
    print(f"silo serve: listening on {cfg.host}:{server.port}"
          + (f", HTTP on {server.http.url}/v1 (owner page {server.http.url}/owner)" if server.http else "")
          + (f", metrics on :{server.metrics_port}/metrics" if server.metrics_port else ""), flush=True)
    while not server._ready.is_set() and not done.is_set():
        server._ready.wait(0.2)
    if server.load_error is not None:
        server.stop()
        print(f"error: loading failed: {server.load_error}", flush=True)
        return 2
    while not done.wait(0.5):
        pass
    print("silo serve: draining", flush=True)
    return 0 if server.drain() else 1
