"""The owners' page's sign-in and forms: a signed session cookie instead of the token itself, and CSRF
defences on every form post.

* Session: signing in with a token sets `silo_owner` to "role.name.expiry.mac": who signed in and until
  when, signed with a key derived from the server's configured tokens (replicas with one configuration
  agree; changing any token ends every session). The token never goes into the cookie, and a signed-in
  owner whose token was removed from the configuration is signed out. HttpOnly, SameSite=Strict, scoped to
  /owner, Secure under TLS.
* CSRF: every page carries a random token in a cookie (`silo_csrf`) and in each of its forms; a post
  whose form token does not equal the cookie's, or whose Origin (or Referer) is another origin than the
  page's own, is refused with 403 before anything runs. SameSite alone stops cross-site posts, not a
  sibling application on the same host or domain.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from urllib.parse import urlsplit

from fastapi import Request

from ..auth import Caller
from .errors import HttpError

COOKIE = "silo_owner"
CSRF_COOKIE = "silo_csrf"
SESSION_SECONDS = 8 * 3600


def _key(server) -> bytes:
    material = [server.admin_token or ""] + [f"{o}={t}" for o, t in sorted(server.owner_tokens().items())]
    return hashlib.sha256(("silo-owner-session\0" + "\0".join(material)).encode()).digest()


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _unb64(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def session_cookie(server, caller: Caller, now: float | None = None) -> str:
    """The signed cookie value for `caller` (see the module docstring)."""
    expiry = int((now or time.time()) + SESSION_SECONDS)
    body = f"{caller.role}.{_b64(caller.name or '')}.{expiry}"
    mac = hmac.new(_key(server), body.encode(), hashlib.sha256).hexdigest()
    return f"{body}.{mac}"


def session_caller(server, value: str) -> Caller | None:
    """The caller a cookie value names, if its signature holds, it has not expired and the caller is still
    configured; else None."""
    try:
        role, name, expiry, mac = value.split(".")
        name = _unb64(name)
    except ValueError:
        return None
    body = f"{role}.{_b64(name)}.{expiry}"
    good = hmac.new(_key(server), body.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac, good) or not expiry.isdigit() or int(expiry) < time.time():
        return None
    if role == "admin" and server.admin_token:
        return Caller("admin")
    if role == "owner" and name in server.owner_tokens():
        return Caller("owner", name)
    return None


def csrf_token(request: Request) -> tuple[str, bool]:
    """The page's CSRF token: the one its cookie holds, or a new one (True: set the cookie)."""
    have = request.cookies.get(CSRF_COOKIE)
    if have and 16 <= len(have) <= 128:
        return have, False
    return secrets.token_urlsafe(24), True


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


async def checked_form(request: Request) -> dict:
    """The posted form, once it is shown to come from this page (CSRF token and origin)."""
    sent = request.headers.get("origin") or (_origin(request.headers["referer"]) if request.headers.get("referer")
                                              else None)
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    if sent is not None and sent.lower() != own:
        raise HttpError(403, "this form was posted from another origin", code="forbidden")
    form = dict(await request.form())
    token, cookie = str(form.pop("csrf", "") or ""), request.cookies.get(CSRF_COOKIE) or ""
    if not token or not cookie or not hmac.compare_digest(token.encode(), cookie.encode()):
        raise HttpError(403, "this form is not from this page (missing or stale form token); reload the page "
                             "and try again", code="forbidden")
    return form
