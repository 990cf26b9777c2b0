"""Who is calling: one place for both doors (gRPC metadata and HTTP headers carry the same
`authorization: Bearer <token>`).

    admin   the operator's token (serve.admin_token): everything
    owner   a data owner's token (serve.owner_tokens): its own content's removals, lookups, ledger line
    client  a generation client's token (serve.api_tokens): generation, when api_tokens is set
    public  no token: generation while api_tokens is empty, Lookup's counts while serve.public_lookup

Tokens are compared in constant time; a configured token may be given as `sha256:<hex>` so the config
never holds the secret itself. A peer address whose tokens fail serve.auth_failures_per_minute times in a
minute is refused (RESOURCE_EXHAUSTED, HTTP 429) for serve.auth_lockout_seconds before any token of it is
checked again: guessing tokens costs a minute per handful of guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from typing import NamedTuple

import grpc

from .rpc import RpcFailure

Code = grpc.StatusCode
MISSING = "missing call metadata 'authorization: Bearer <token>'"


class Caller(NamedTuple):
    role: str  # admin | owner | client | public
    name: str | None = None  # the owner's or client's name


class UnknownToken(RpcFailure):
    """A well-formed bearer token that is neither the admin token nor an owner token (PERMISSION_DENIED
    on gRPC, as ever; 401 on the HTTP door, where an unknown API key is an authentication failure)."""

    def __init__(self):
        super().__init__(Code.PERMISSION_DENIED, "token not recognised (neither the admin token nor an owner token)")

    def __reduce__(self):
        return type(self), ()


class FailedAttempts:
    """Failed token checks per peer address, and the addresses locked out for having too many."""

    def __init__(self, per_minute: int, lockout_seconds: float):
        self.per_minute, self.lockout = per_minute, lockout_seconds
        self._fails: dict[str, deque] = {}
        self._locked: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, peer: str) -> None:
        """RESOURCE_EXHAUSTED while `peer` is locked out."""
        with self._lock:
            until = self._locked.get(peer, 0.0)
        wait = until - time.monotonic()
        if wait > 0:
            raise RpcFailure(Code.RESOURCE_EXHAUSTED, f"too many failed token checks from this address; retry in "
                                                      f"{wait:.0f}s")

    def failed(self, peer: str) -> None:
        now = time.monotonic()
        with self._lock:
            fails = self._fails.setdefault(peer, deque())
            fails.append(now)
            while fails and fails[0] < now - 60.0:
                fails.popleft()
            if len(fails) >= self.per_minute:
                self._locked[peer] = now + self.lockout
                fails.clear()


def _guarded(server, peer: str):
    """The server's failed-attempts record (None for a bare object without one, as in unit tests)."""
    attempts = getattr(server, "auth_failures", None)
    if attempts is not None:
        attempts.check(peer)
    return attempts


def peer_host(peer: str) -> str:
    """The address of a gRPC peer ("ipv4:127.0.0.1:5000" -> "127.0.0.1"), the client key of anonymous calls."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return rest.rsplit(":", 1)[0] if kind == "ipv4" else peer


def token_matches(given: str, configured: str) -> bool:
    """Constant-time check of a presented token against a configured value (plain or sha256:<hex>)."""
    if configured.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(digest, configured[len("sha256:"):].lower())
    return hmac.compare_digest(given.encode(), configured.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an `authorization` value; None when there is none; UNAUTHENTICATED when it is not
    `Bearer <token>`."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise RpcFailure(Code.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
    return value


def is_admin(server, authorization: str | None) -> bool:
    """Does `authorization` carry the admin token? (Never raises: for choosing what to show.)"""
    try:
        token = bearer(authorization)
    except RpcFailure:
        return False
    admin = server.admin_token
    return bool(admin) and token is not None and hmac.compare_digest(token.encode(), admin.encode())


def require_admin(server, authorization: str | None, peer: str = "") -> None:
    """The admin API's gate: disabled without an admin token, else the admin token or nothing."""
    if server.admin_token is None:
        raise RpcFailure(Code.PERMISSION_DENIED, "the admin API is disabled: configure serve.admin_token "
                                                 "or serve.admin_token_env")
    attempts = _guarded(server, peer)
    if bearer(authorization) is None:
        raise RpcFailure(Code.UNAUTHENTICATED, MISSING)
    if not is_admin(server, authorization):
        if attempts is not None:
            attempts.failed(peer)
        raise RpcFailure(Code.PERMISSION_DENIED, "wrong admin token")


def resolve_caller(server, authorization: str | None, optional: bool = False, peer: str = "") -> Caller | None:
    """The admin or a data owner behind `authorization`; None when no token was given and `optional`."""
    token = bearer(authorization)
    if token is None:
        if optional:
            return None
        raise RpcFailure(Code.UNAUTHENTICATED, MISSING + " (the admin token or the data owner's token)")
    attempts = _guarded(server, peer)
    if is_admin(server, authorization):
        return Caller("admin")
    for owner, configured in server.owner_tokens().items():
        if token_matches(token, configured):
            return Caller("owner", owner)
    if attempts is not None:
        attempts.failed(peer)
    raise UnknownToken()


def check_generation_access(server, authorization: str | None, peer: str = "") -> str | None:
    """Generation on either door: open while `serve.api_tokens` is empty (the token, if any, is ignored);
    else a client, owner or admin token is needed. Returns the caller's name, when known."""
    tokens = server.cfg.api_tokens
    if not tokens:
        return None
    given = bearer(authorization)
    _guarded(server, peer)
    for name, configured in tokens.items():
        if given and configured and token_matches(given, configured):
            return name
    try:
        caller = resolve_caller(server, authorization, peer=peer)
    except UnknownToken:
        raise RpcFailure(Code.UNAUTHENTICATED, "token not recognised (generation needs a client token of "
                                               "serve.api_tokens, an owner token or the admin token)") from None
    return caller.name or caller.role


def viewer(server, authorization: str | None) -> Caller:
    """Who is looking at a response (never raises, records no failure: generation access was checked
    already): the admin, an owner, or the public (a client token or none)."""
    if is_admin(server, authorization):
        return Caller("admin")
    try:
        token = bearer(authorization)
    except RpcFailure:
        token = None
    for owner, configured in server.owner_tokens().items() if token else ():
        if token_matches(token, configured):
            return Caller("owner", owner)
    return Caller("public")
