"""Errors of the HTTP door in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every failure the gRPC door maps to a status code (serving/rpc.py `_status_for`) maps here to the
matching HTTP status, so both doors refuse the same things the same way: a bad field is 400 naming the
field (`param`), a full queue 429, a missing or unknown token 401, a token without the right 403.
"""

from __future__ import annotations

import re

import grpc

from silo.model.types import SiloInputError

from ..auth import UnknownToken
from ..rpc import _status_for

Code = grpc.StatusCode
HTTP_STATUS = {Code.INVALID_ARGUMENT: 400, Code.UNAUTHENTICATED: 401, Code.PERMISSION_DENIED: 403,
               Code.NOT_FOUND: 404, Code.FAILED_PRECONDITION: 409, Code.RESOURCE_EXHAUSTED: 429,
               Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504, Code.CANCELLED: 499}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         409: "conflict_error", 413: "invalid_request_error", 421: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout_error"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or {400: "invalid_value", 401: "invalid_api_key", 403: "forbidden", 404: "not_found",
                             409: "failed_precondition", 429: "rate_limit_exceeded", 503: "unavailable",
                             504: "timeout"}.get(status, "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> HttpError:
    """400 for request field `param` (its name as the HTTP API spells it)."""
    return HttpError(400, f"{param}: {message}", param)


def http_field(name: str) -> str:
    """A field path of the validation (silo.v1 names) as the HTTP body spells it: params.max_tokens -> max_tokens."""
    return name.removeprefix("params.")


def http_error(exc: BaseException) -> HttpError:
    """The HTTP status and OpenAI error body for anything a handler raised."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, UnknownToken):
        return HttpError(401, str(exc), code="invalid_api_key")
    if isinstance(exc, SiloInputError) and exc.field:
        name = http_field(exc.field)
        text = str(exc)
        text = text.split(": ", 1)[1] if text.startswith(exc.field + ": ") else text
        return bad(name, text)
    code, message = _status_for(exc)  # type: ignore[arg-type]
    status = HTTP_STATUS.get(code, 500)
    param = None
    if status == 400 and (m := _FIELD.match(message)):
        param = http_field(m.group(1))
        message = f"{param}: {message[m.end():]}"
    return HttpError(status, message, param)
