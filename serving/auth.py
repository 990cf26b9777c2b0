"""Who is calling: one place for both doors (gRPC metadata and HTTP headers carry the same
`authorization: Bearer <token>`).

    admin   the operator's token (serve.admin_token): everything
    owner   a data owner's token (serve.owner_tokens): its own content's removals, lookups, ledger line
    client  a generation client's token (serve.api_tokens): generation, when api_tokens is set
    public  no token: generation while api_tokens is empty, Lookup's counts while serve.public_lookup

Tokens are compared in constant time; a configured token may be given as `sha256:<hex>` so the config
never holds the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac
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


def require_admin(server, authorization: str | None) -> None:
    """The admin API's gate: disabled without an admin token, else the admin token or nothing."""
    if server.admin_token is None:
        raise RpcFailure(Code.PERMISSION_DENIED, "the admin API is disabled: configure serve.admin_token "
                                                 "or serve.admin_token_env")
    if bearer(authorization) is None:
        raise RpcFailure(Code.UNAUTHENTICATED, MISSING)
    if not is_admin(server, authorization):
        raise RpcFailure(Code.PERMISSION_DENIED, "wrong admin token")


def resolve_caller(server, authorization: str | None, optional: bool = False) -> Caller | None:
    """The admin or a data owner behind `authorization`; None when no token was given and `optional`."""
    token = bearer(authorization)
    if token is None:
        if optional:
            return None
        raise RpcFailure(Code.UNAUTHENTICATED, MISSING + " (the admin token or the data owner's token)")
    if is_admin(server, authorization):
        return Caller("admin")
    for owner, configured in server.cfg.resolved_owner_tokens().items():
        if token_matches(token, configured):
            return Caller("owner", owner)
    raise UnknownToken()


def check_generation_access(server, authorization: str | None) -> str | None:
    """Generation on either door: open while `serve.api_tokens` is empty (the token, if any, is ignored);
    else a client, owner or admin token is needed. Returns the caller's name, when known."""
    tokens = server.cfg.api_tokens
    if not tokens:
        return None
    given = bearer(authorization)
    for name, configured in tokens.items():
        if given and configured and token_matches(given, configured):
            return name
    try:
        caller = resolve_caller(server, authorization)
    except UnknownToken:
        raise RpcFailure(Code.UNAUTHENTICATED, "token not recognised (generation needs a client token of "
                                               "serve.api_tokens, an owner token or the admin token)") from None
    return caller.name or caller.role
