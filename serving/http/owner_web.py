"""The data owners' door: a web page (/owner) and the same actions as JSON (/v1/owner/...).

Both call DataOwnerService's actions (serving/dataowner.py) with the caller resolved from a bearer token,
so the rules are the gRPC door's: without a token Lookup shows counts only (when serve.public_lookup), an
owner token also its own matching documents and may remove and follow only its own content, the admin
token everything.

The page is plain server-rendered HTML (templates/, no build step). Signing in sets a signed session
cookie, never the token itself, and every form carries a CSRF token checked with the post's origin
(owner_session.py).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from silo.datastore.removal_records import Receipt

from ..auth import resolve_caller
from ..gen import silo_pb2 as pb
from .convert import as_dict
from .errors import HttpError, bad, http_error
from .openai_api import json_body
from .owner_session import COOKIE, CSRF_COOKIE, checked_form, csrf_token, session_caller, session_cookie

STEPS = ("received", "applied", "compacted", "verified")
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def _ids(value) -> list[str]:
    if isinstance(value, list):
        return [str(x).strip() for x in value if str(x).strip()]
    return [x.strip() for x in str(value or "").replace(",", "\n").splitlines() if x.strip()]


def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
    """A page with the CSRF token its forms carry (set as a cookie when the browser has none yet)."""
    token, new = csrf_token(request)
    resp = HTMLResponse(_env.get_template(name).render(steps=STEPS, csrf=token, **ctx), status_code=status)
    if new:
        resp.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", path="/owner",
                        secure=request.url.scheme == "https")
    return resp


def error_page(door, request: Request, err: HttpError) -> Response:
    if request.url.path.startswith("/owner/removals/") and request.url.path.endswith(".json"):
        return JSONResponse(err.body(), status_code=err.status)
    return render(request, "owner.html", err.status, error=err.message, **_page_state(door, request, None))


def _page_state(door, request: Request, caller) -> dict:
    return {"signed_in": caller, "public_lookup": door.server.cfg.public_lookup, "removals": [], "lookup": None,
            "form": {}}


def removal_request(body: dict) -> pb.RemovalRequest:
    """A removal from a JSON body or a form: owner, document_ids, shards, requester, reason."""
    for name in ("owner", "requester", "reason", "request_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad(name, "must be a string")
    return pb.RemovalRequest(owner=(body.get("owner") or "").strip(), document_ids=_ids(body.get("document_ids")),
                                   shards=_ids(body.get("shards")), requester=(body.get("requester") or "").strip(),
                                   reason=(body.get("reason") or "").strip(), request_id=body.get("request_id") or "",
                                   skip_verification=bool(body.get("skip_verification")), wait=False)


def lookup_request(body: dict) -> pb.LookupRequest:
    for name in ("text", "document_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad(name, "must be a string")
    text, doc = body.get("text") or "", (body.get("document_id") or "").strip()
    if bool(text.strip()) == bool(doc):
        raise bad("text" if not doc else "document_id", "give exactly one of text or document_id")
    return pb.LookupRequest(text=text, document_id=doc)


def _peer(request: Request) -> str:
    return request.client.host if request.client else ""


def receipt_html(request_id: str, status: str, receipt: Receipt) -> str:
    data = receipt.to_json()
    return _env.get_template("receipt.html").render(request_id=request_id, status=status, receipt=data,
                                                    raw=json.dumps(data, indent=1, ensure_ascii=False))


class _Callers:
    """Who calls an owner route: from the Authorization header (JSON routes) or the page's cookie."""

    def __init__(self, server):
        self.server = server

    def owners_caller(self, authorization: str | None, optional: bool = False, peer: str = ""):
        caller = resolve_caller(self.server, authorization, optional, peer=peer)
        if caller is not None and self.server.engine is None:
            raise HttpError(503, "the model is still loading; retry shortly")
        return caller

    def page_caller(self, request: Request, required: bool):
        value = request.cookies.get(COOKIE)
        caller = session_caller(self.server, value) if value else None
        if caller is None and value:
            raise HttpError(401, "your sign-in has expired or is no longer valid; sign in again")
        if caller is None and required:
            raise HttpError(401, "sign in with your owner token first")
        if caller is not None and self.server.engine is None:
            raise HttpError(503, "the model is still loading; retry shortly")
        return caller


def build_owner_router(door) -> APIRouter:
    """The owners' routes: the JSON API, the page, and a removal's page and receipt."""
    router = APIRouter()
    callers = _Callers(door.server)
    _json_routes(router, door, callers)
    _page_routes(router, door, callers)
    _removal_routes(router, door, callers)
    return router


def _json_routes(router: APIRouter, door, callers: _Callers) -> None:
    server, actions, owners_caller = door.server, door.server.dataowner, callers.owners_caller

    @router.post("/v1/owner/lookup")
    async def api_lookup(request: Request):
        body = await json_body(request, door.body_limit)
        caller = owners_caller(request.headers.get("authorization"), optional=server.cfg.public_lookup,
                               peer=_peer(request))
        res = await run_in_threadpool(actions.lookup_for, caller, lookup_request(body), {})
        return as_dict(res)

    @router.post("/v1/owner/removals")
    async def api_submit(request: Request):
        door.check_open()
        body = await json_body(request, door.body_limit)
        caller = owners_caller(request.headers.get("authorization"), peer=_peer(request))
        res = await run_in_threadpool(actions.submit, caller, removal_request(body), {})
        return JSONResponse(as_dict(res), status_code=202)

    @router.get("/v1/owner/removals")
    async def api_list(request: Request, owner: str = ""):
        caller = owners_caller(request.headers.get("authorization"), peer=_peer(request))
        res = await run_in_threadpool(actions.list_for, caller, owner)
        return {"removals": [as_dict(r) for r in res.removals]}

    @router.get("/v1/owner/removals/{request_id}")
    async def api_get(request: Request, request_id: str):
        caller = owners_caller(request.headers.get("authorization"), peer=_peer(request))
        return as_dict(await run_in_threadpool(actions.get, caller, request_id))

    @router.get("/v1/owner/removals/{request_id}/receipt")
    async def api_receipt(request: Request, request_id: str):
        caller = owners_caller(request.headers.get("authorization"), peer=_peer(request))
        return (await run_in_threadpool(actions.receipt, caller, request_id))[1].to_json()


async def _home(door, request: Request, caller, status: int = 200, **extra):
    """The owners' page: lookup, sign-in, and a signed-in owner's removals."""
    state = _page_state(door, request, caller)
    if caller is not None:
        res = await run_in_threadpool(door.server.dataowner.list_for, caller, "")
        state["removals"] = [as_dict(r) for r in res.removals]
    state.update(extra)
    return render(request, "owner.html", status, **state)


def _page_routes(router: APIRouter, door, callers: _Callers) -> None:
    server, actions, page_caller = door.server, door.server.dataowner, callers.page_caller

    @router.get("/owner")
    async def home(request: Request):
        try:
            caller = page_caller(request, required=False)
        except HttpError as err:  # a stale cookie: sign out
            resp = render(request, "owner.html", err.status, error=err.message, **_page_state(door, request, None))
            resp.delete_cookie(COOKIE, path="/owner")
            return resp
        return await _home(door, request, caller)

    @router.post("/owner/signin")
    async def signin(request: Request):
        form = await checked_form(request)
        token = str(form.get("token") or "").strip()
        if not token:
            raise HttpError(401, "token: enter your owner token", "token")
        caller = callers.owners_caller(f"Bearer {token}", peer=_peer(request))
        resp = RedirectResponse("/owner", status_code=303)
        resp.set_cookie(COOKIE, session_cookie(server, caller), httponly=True, samesite="strict", path="/owner",
                        secure=bool(server.cfg.tls_cert))
        return resp

    @router.post("/owner/signout")
    async def signout(request: Request):
        await checked_form(request)
        resp = RedirectResponse("/owner", status_code=303)
        resp.delete_cookie(COOKIE, path="/owner")
        return resp

    @router.post("/owner/lookup")
    async def page_lookup(request: Request):
        form = await checked_form(request)
        caller = page_caller(request, required=not server.cfg.public_lookup)
        try:
            res = await run_in_threadpool(actions.lookup_for, caller, lookup_request(form), {})
        except Exception as exc:  # noqa: BLE001 - shown on the page, with the form kept
            err = http_error(exc)
            return await _home(door, request, caller, err.status, error=err.message, form=form)
        look = as_dict(res)
        q = max(1, look["query_sentences"])
        look["percent"] = round(100 * look["matched_sentences"] / q) if look["query_sentences"] else None
        look["role"] = caller.role if caller else "public"
        return await _home(door, request, caller, lookup=look, form=form)

    @router.post("/owner/removals")
    async def page_submit(request: Request):
        door.check_open()
        form = await checked_form(request)
        caller = page_caller(request, required=True)
        try:
            res = await run_in_threadpool(actions.submit, caller, removal_request(form), {})
        except Exception as exc:  # noqa: BLE001 - shown on the page
            err = http_error(exc)
            return await _home(door, request, caller, err.status, error=err.message, form=form)
        return RedirectResponse(f"/owner/removals/{res.request_id}", status_code=303)


def _removal_routes(router: APIRouter, door, callers: _Callers) -> None:
    actions, page_caller = door.server.dataowner, callers.page_caller

    @router.get("/owner/removals/{request_id}")
    async def page_status(request: Request, request_id: str):
        caller = page_caller(request, required=True)
        status = as_dict(await run_in_threadpool(actions.get, caller, request_id))
        stamps = (await run_in_threadpool(actions.state, caller, request_id)).timestamps
        final = status["status"] in ("verified", "failed") or (status["status"] == "compacted"
                                                                 and "verified" not in stamps and _unverified(actions, request_id))
        return render(request, "removal.html", removal=status, stamps=stamps, final=final, signed_in=caller)

    @router.get("/owner/removals/{request_id}/receipt.json")
    async def page_receipt_json(request: Request, request_id: str):
        caller = page_caller(request, required=True)
        _, receipt = await run_in_threadpool(actions.receipt, caller, request_id)
        return Response(json.dumps(receipt.to_json(), indent=1, ensure_ascii=False), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{html.escape(request_id)}.json"'})

    @router.get("/owner/removals/{request_id}/receipt.html")
    async def page_receipt_html(request: Request, request_id: str):
        caller = page_caller(request, required=True)
        state, receipt = await run_in_threadpool(actions.receipt, caller, request_id)
        return HTMLResponse(receipt_html(request_id, state.served_status, receipt))


def _unverified(actions, request_id: str) -> bool:
    """A removal submitted without verification stops at compacted."""
    return not actions.finishing(request_id)
