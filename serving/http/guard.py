"""The HTTP door's defences below the routes: connections, request sizes, hosts, security headers.

* `guarded_protocol(header_timeout)`: uvicorn's h11 protocol with a deadline for a request's line and
  headers. uvicorn arms its keep-alive timer only after a response, so a connection that never sends a
  request stayed open for good, and enough of them made every request (health included) a 503 at the
  connection limit. Here a connection that has not completed a request's head within `header_timeout`
  seconds of opening, or of its last response, is closed; partial headers do not reset the clock.
* `Guard`: an ASGI middleware that refuses, before any route runs, a Host header the door does not
  answer (DNS rebinding to a loopback door) and a body over the door's limit (Content-Length, or counted
  as it arrives: form posts included).
* `SECURITY_HEADERS`, which the door's outermost middleware adds to every response: no framing, no
  sniffing, a content security policy that allows only the page's own forms and styles.
"""

from __future__ import annotations

import ipaddress

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import HttpError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
                                  b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
]


class _GuardedH11(H11Protocol):
    header_timeout = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if getattr(self, "_head_deadline", None) is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request is being answered: its head arrived in time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request's head has its own deadline

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:
                pass
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type:
    """The protocol class uvicorn runs for the HTTP door (see the module docstring)."""
    return type("SiloH11Protocol", (_GuardedH11,), {"header_timeout": float(header_timeout)})


def allowed_hosts(configured: list[str] | None, bind_host: str) -> set[str] | None:
    """The Host names the door answers: the configured ones, else the loopback names when it listens on a
    loopback address (a browser pointed at it through a rebinding DNS name is refused), else any (None)."""
    if configured is not None:
        return {h.lower().strip("[]") for h in configured}
    try:
        loopback = ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        loopback = bind_host == "localhost"
    return set(LOOPBACK_NAMES) if loopback else None


def host_name(value: bytes) -> str:
    """The name in a Host header, without its port."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Guard:
    """ASGI middleware: Host check and body limit (see the module docstring). Errors are raised as
    HttpError for the door's error middleware outside it to answer."""

    def __init__(self, app, body_limit: int, hosts: set[str] | None):
        self.app, self.body_limit, self.hosts = app, body_limit, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and host_name(headers.get(b"host", b"")) not in self.hosts:
            raise HttpError(421, "this server does not answer for that Host", code="misdirected_request")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.body_limit):
            raise HttpError(413, f"the request body is larger than {self.body_limit} bytes", code="request_too_large")
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.body_limit:
                    raise HttpError(413, f"the request body is larger than {self.body_limit} bytes",
                                    code="request_too_large")
            return message

        await self.app(scope, counted, send)
