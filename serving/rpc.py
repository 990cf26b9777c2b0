"""What every silo.v1 handler shares: status mapping, metrics and one JSON log line per call."""

from __future__ import annotations

import functools
import logging
import time

import grpc

from silo.datastore.format import DatastoreError
from silo.model.types import SiloInputError

from .engine import EngineBusy, EngineClosed
from .metrics import log_request

log = logging.getLogger("silo.serving")
Code = grpc.StatusCode


class RpcFailure(Exception):
    """Raised by handlers to end a call with `code` (instead of context.abort, which the wrapper would catch)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # travels between processes (a cluster's replicas and its store controller)
        return type(self), (self.code, str(self))


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, str(exc)
    if isinstance(exc, SiloInputError):  # includes requests.InvalidRequest (message names the field)
        return Code.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineBusy):
        return Code.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, EngineClosed):
        return Code.UNAVAILABLE, str(exc)
    if isinstance(exc, (DatastoreError, OSError)):
        return Code.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, TimeoutError):
        return Code.DEADLINE_EXCEEDED, str(exc)
    return Code.INTERNAL, "internal error; see the server log"


class _Call:
    """One call's bookkeeping: counted and timed on the server's metrics, one log line at the end, an
    exception turned into its status code."""

    def __init__(self, method: str, server, context):
        self.method, self.server, self.context = method, server, context
        self.info: dict = {}
        self.code = "OK"
        self.started = time.monotonic()
        server.metrics.requests.labels(method).inc()
        server.metrics.in_flight.inc()

    def fail(self, exc: Exception) -> None:
        code, msg = _status_for(exc)
        self.code = code.name
        self.info["error"] = msg
        if code == Code.INTERNAL:
            log.error("%s failed", self.method, exc_info=exc, extra={"fields": {"method": self.method, **self.info}})
        self.context.abort(code, msg)  # raises; grpc sends the status

    def end(self) -> None:
        info, context = self.info, self.context
        code = self.code
        if code == "OK" and not info.get("complete") and not context.is_active():
            rem = context.time_remaining()  # the client went away before we were done
            code = "DEADLINE_EXCEEDED" if rem is not None and rem <= 0 else "CANCELLED"
        m = self.server.metrics
        m.in_flight.dec()
        m.latency.labels(self.method).observe(time.monotonic() - self.started)
        if code != "OK":
            m.errors.labels(self.method, code).inc()
        info.pop("complete", None)
        log_request(self.method, code, self.started, peer=context.peer(), **info)


def _handled(method: str, streaming: bool = False):
    """Metrics, one JSON log line and exception-to-status mapping around a handler.

    Handlers take (self, request, context, info) and may put fields for the log line into `info`.
    """

    def deco(fn):
        if streaming:
            @functools.wraps(fn)
            def wrapper(self, request, context):
                call = _Call(method, self.server, context)
                try:
                    yield from fn(self, request, context, call.info)
                    call.info["complete"] = True
                except Exception as exc:  # noqa: BLE001 - mapped to a status, never crashes the server
                    call.fail(exc)
                finally:
                    call.end()
        else:
            @functools.wraps(fn)
            def wrapper(self, request, context):
                call = _Call(method, self.server, context)
                try:
                    out = fn(self, request, context, call.info)
                    call.info["complete"] = context.is_active()
                    return out
                except Exception as exc:  # noqa: BLE001
                    call.fail(exc)
                finally:
                    call.end()
        return wrapper

    return deco
