"""Prometheus metrics and JSON-lines request logs.

Each server gets its own CollectorRegistry (not the process-global one) so several servers can live in
one process, as they do in the tests and the load script.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

access_log = logging.getLogger("silo.serving.access")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("silo_requests", "RPCs started, by method", ["method"], registry=r)
        self.errors = Counter("silo_request_errors", "RPCs that ended with a non-OK status, by method and code",
                              ["method", "code"], registry=r)
        self.latency = Histogram("silo_request_latency_seconds", "RPC latency, by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("silo_time_to_first_token_seconds", "arrival to first text delta (queueing included)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("silo_generated_tokens", "tokens generated", registry=r)
        self.generation_seconds = Counter("silo_generation_seconds", "worker time spent generating "
                                          "(tokens / this = tokens per second)", registry=r)
        self.batch_size = Gauge("silo_batch_size", "generations advancing together in the worker's batch",
                                registry=r)
        self.steps = Counter("silo_batch_steps", "batched decoding steps (one token for every sequence in the batch)",
                             registry=r)
        self.queue_depth = Gauge("silo_queue_depth", "requests waiting for the worker", registry=r)
        self.in_flight = Gauge("silo_in_flight", "RPCs being handled", registry=r)
        self.finish = Counter("silo_finish_reasons", "finished generations by finish_reason", ["reason"], registry=r)
        self.store_generation = Gauge("silo_store_generation", "generation of the attached datastore", registry=r)
        # the contribution ledger (serving/ledger.py), per data owner, since this process started
        self.owner_tokens = Counter("silo_owner_attributed_tokens", "generated tokens attributed to an owner's "
                                    "content (share of each sentence * its tokens)", ["owner"], registry=r)
        self.owner_share = Counter("silo_owner_attributed_share", "sum over responses of an owner's share of the "
                                   "response's tokens", ["owner"], registry=r)
        self.owner_responses = Counter("silo_owner_credited_responses", "responses that credited an owner",
                                       ["owner"], registry=r)
        self.ledger_errors = Counter("silo_ledger_errors", "responses the ledger failed to record", registry=r)
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields passed as `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_request(method: str, code: str, started: float, **fields) -> None:
    fields = {"event": "rpc", "method": method, "code": code,
              "latency_ms": round((time.monotonic() - started) * 1000, 2), **fields}
    access_log.info("%s %s", method, code, extra={"fields": fields})
