"""The HTTP door: an OpenAI-compatible API and the data owners' web page, beside gRPC on the same engine.

    door = HttpDoor(server).start()   # binds serve.http_host:serve.http_port (0 = a free port), in a thread
    door.url                          # http://127.0.0.1:8080
    door.close_intake(); door.stop(grace)

It holds no model of its own: every route calls the SiloServer's Engine and DataOwnerService, so a
generation, a lookup or a removal behaves the same whichever door it came through (validation, roles,
backpressure). Routes:

    GET  /health                      200 {"status": "serving"} | 503 loading/draining
    GET  /v1/models                   the served model
    POST /v1/completions              OpenAI completions (stream: server-sent events)
    POST /v1/chat/completions         OpenAI chat completions (stream: server-sent events)
    /v1/owner/...                     the DataOwner actions as JSON (serving/http/owner_web.py)
    /owner                            the data owners' web page
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..metrics import log_request
from .errors import HttpError, http_error
from .guard import SECURITY_HEADERS, Guard, allowed_hosts, guarded_protocol
from .answers import GENERATION_HEADER
from .openai_api import build_router
from .owner_web import build_owner_router

log = logging.getLogger("silo.serving.http")


class HttpDoor:
    def __init__(self, server):
        self.server = server
        self.port: int | None = None
        self._closed = False
        self._uvicorn: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        # a JSON body holds at most the prompt or messages (serve.max_prompt_chars, up to 4 UTF-8 bytes a
        # character, escapes aside) and some parameters; beyond that it is refused unread (413)
        self.body_limit = 6 * server.cfg.max_prompt_chars + (64 << 10)
        self.app = self._build()

    @property
    def host(self) -> str:
        return self.server.cfg.http_host or self.server.cfg.host

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1"
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{'https' if self.server.cfg.tls_cert else 'http'}://{host}:{self.port}"

    def check_open(self) -> None:
        if self._closed:
            raise HttpError(503, "the server is shutting down; retry on another replica", code="unavailable")

    # ------------------------------------------------------------------------------------ app
    def _build(self) -> FastAPI:
        app = FastAPI(title="SILO", docs_url=None, redoc_url=None, openapi_url=None)
        metrics = self.server.metrics

        def error_response(request: Request, exc: Exception):
            err = http_error(exc)
            if err.status >= 500 and err.status not in (503, 504):
                log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
            if request.url.path.startswith("/owner"):
                from .owner_web import error_page

                return error_page(self, request, err)
            return JSONResponse(err.body(), status_code=err.status,
                                headers={"Retry-After": "1"} if err.status in (429, 503) else None)

        @app.exception_handler(StarletteHTTPException)
        async def _http(request: Request, exc: StarletteHTTPException):
            return error_response(request, HttpError(exc.status_code, str(exc.detail), code="not_found"
                                                     if exc.status_code == 404 else "invalid_request"))

        @app.exception_handler(RequestValidationError)
        async def _invalid(request: Request, exc: RequestValidationError):
            first = (exc.errors() or [{}])[0]
            param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
            return error_response(request, HttpError(400, f"{param}: {first.get('msg', 'invalid')}", param))

        app.add_middleware(Guard, body_limit=self.body_limit,
                           hosts=allowed_hosts(self.server.cfg.http_allowed_hosts, self.host))
        app.add_middleware(_Errors, metrics=metrics, error_response=error_response, server=self.server)

        @app.get("/health")
        async def health():
            if self._closed:
                return JSONResponse({"status": "draining"}, status_code=503)
            if self.server.load_error is not None:
                return JSONResponse({"status": "failed", "error": str(self.server.load_error)}, status_code=503)
            if self.server.engine is None:
                return JSONResponse({"status": "loading"}, status_code=503)
            lm = self.server.engine.lm
            return {"status": "serving", "fingerprint": lm.fingerprint, "queue_depth": self.server.engine.queue_depth,
                    "store_generation": lm.store.generation if lm.store is not None else None}

        @app.get("/")
        async def root():
            return RedirectResponse("/owner", status_code=303)

        app.include_router(build_router(self))
        app.include_router(build_owner_router(self))
        return app

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> HttpDoor:
        cfg = self.server.cfg
        host = self.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, cfg.http_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"serve.http_port: could not bind {host}:{cfg.http_port}: {exc}") from None
        self.port = sock.getsockname()[1]
        # connections, not requests, are what limit_concurrency counts: with idle and slow-header connections
        # closed after http_header_timeout (guard.py) the limit is reached only by real traffic
        ucfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                              ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key, timeout_graceful_shutdown=None,
                              limit_concurrency=cfg.http_max_connections, timeout_keep_alive=5,
                              http=guarded_protocol(cfg.http_header_timeout), h11_max_incomplete_event_size=16 * 1024)
        self._uvicorn = uvicorn.Server(ucfg)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="silo-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            raise OSError(f"the HTTP door did not start on {host}:{self.port}")
        log.info("http listening", extra={"fields": {"event": "http_listening", "url": self.url}})
        return self

    def close_intake(self) -> None:
        """New generations and removals get 503 (health too); requests in flight go on."""
        self._closed = True

    def stop(self, grace: float = 0.0) -> None:
        if self._uvicorn is None:
            return
        self._closed = True
        self._uvicorn.config.timeout_graceful_shutdown = max(grace, 0.5)
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(grace + 5.0)


class _Errors:
    """Outermost: any exception a route raises becomes its status and error body (OpenAI's shape; on /owner a
    page), before the response starts; also counts, times and logs every request like the gRPC door."""

    def __init__(self, app, metrics, error_response, server):
        self.app, self.metrics, self.error_response, self.server = app, metrics, error_response, server

    def _mark_generation(self, message) -> None:
        """Every response names the store generation it was served from: a generation's own (set by its
        route), else the one served when the response starts."""
        headers = message.setdefault("headers", [])
        if any(k.lower() == GENERATION_HEADER.encode() for k, _ in headers):
            return
        engine = self.server.engine
        store = engine.lm.store if engine is not None else None
        if store is not None:
            headers.append((GENERATION_HEADER.encode(), str(store.generation).encode()))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        method = f"HTTP {scope.get('method')} {path if path in _COUNTED else 'other'}"
        started, state = time.monotonic(), {"status": 500, "sent": False}

        async def sending(message):
            if message["type"] == "http.response.start":
                state.update(status=message["status"], sent=True)
                self._mark_generation(message)
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        m = self.metrics
        m.requests.labels(method).inc()
        m.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # mapped to a status: nothing a client sends stops the server
            if state["sent"]:
                log.error("%s failed after its response started", method, exc_info=exc)
            else:
                await self.error_response(Request(scope), exc)(scope, receive, sending)
        finally:
            m.in_flight.dec()
            m.latency.labels(method).observe(time.monotonic() - started)
            if state["status"] >= 400:
                m.errors.labels(method, str(state["status"])).inc()
            client = scope.get("client")
            log_request(method, str(state["status"]), started, peer=client[0] if client else "")


_COUNTED = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/owner", "/owner/lookup",
            "/owner/removals", "/v1/owner/lookup", "/v1/owner/removals"}
