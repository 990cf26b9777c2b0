"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (server-sent events when `stream`), /v1/models.

A request body is turned into the silo.v1 request message and validated by the same code as the gRPC
door (serving/requests.py), then enqueued on the same Engine; a rejection names the field as the body
spells it. SILO's extras ride in each choice as `choice["silo"]`:

    {"attributions": [...], "notices": [...], "guard_events": [...], "mode": "knn", "store_generation": 2,
     "request_id": "g000042"}

with the same fields as silo.v1's CompleteResponse (attributions when `return_attributions`, default true).
Non-standard request fields (mode, k, lmbda, tau, top_k, return_attributions, max_verbatim_chars,
exclude_owners, exclude_tiers, require_notices) go at the top level of the body (`extra_body` in the openai
client).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..auth import check_generation_access
from ..gen import silo_pb2 as pb
from ..messages import completion_message
from ..requests import chat_request, complete_request
from .convert import as_dict
from .errors import HttpError, bad

FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}
_INTS = ("max_tokens", "top_k", "seed", "k", "max_verbatim_chars")
_FLOATS = ("temperature", "top_p", "lmbda", "tau")
_UNSUPPORTED = {"logprobs": (None, False), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                "tools": (None, []), "functions": (None, []), "top_logprobs": (None, 0)}


def model_id(server) -> str:
    return Path(server.cfg.model).name


async def json_body(request: Request, limit: int = 1 << 20) -> dict:
    """The request's JSON object; 413 past `limit` bytes (read no further), 400 when not a JSON object."""
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise HttpError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        body = json.loads(bytes(raw) or b"null")
    except ValueError as exc:
        raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    return body


def gen_params(body: dict, chat: bool) -> pb.GenerationParams:
    """The body's sampling and SILO fields as silo.v1 GenerationParams; type errors name the field."""
    p = pb.GenerationParams(return_attributions=True)
    if chat and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    for name in _INTS + _FLOATS:
        v = body.get(name)
        if v is None:
            continue
        ok = isinstance(v, int) if name in _INTS else isinstance(v, (int, float)) and math.isfinite(v)
        if isinstance(v, bool) or not ok:
            raise bad(name, f"must be {'an integer' if name in _INTS else 'a number'} (got {json.dumps(v)})")
        try:
            setattr(p, name, v)
        except (ValueError, TypeError):
            raise bad(name, f"out of range (got {v})") from None
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    for name, value in (("stop", stop), ("exclude_owners", body.get("exclude_owners")),
                        ("exclude_tiers", body.get("exclude_tiers"))):
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad(name, "must be a list of strings" + (" or a string" if name == "stop" else ""))
        getattr(p, name).extend(value)
    for name in ("return_attributions", "require_notices"):
        if body.get(name) is not None:
            if not isinstance(body[name], bool):
                raise bad(name, "must be true or false")
            setattr(p, name, body[name])
    if body.get("mode") is not None:
        if not isinstance(body["mode"], str):
            raise bad("mode", "must be a string")
        p.mode = body["mode"]
    n = body.get("n", 1)
    if n not in (None, 1):
        raise bad("n", "only n=1 is served (one choice per request)")
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise bad(name, "not supported by this server")
    return p


def silo_extension(res, request_id: str) -> dict:
    """The `silo` field of a choice: silo.v1 CompleteResponse's attributions, notices and guard events."""
    msg = as_dict(completion_message(res, request_id))
    return {"attributions": msg["attributions"], "notices": msg["notices"], "guard_events": msg["guard_events"],
            "mode": res.mode, "store_generation": res.store_generation, "request_id": request_id}


GENERATION_HEADER = "x-silo-store-generation"


def generation_header(job) -> dict:
    """The store generation a generation was admitted on (known before its first token is sent)."""
    gen = job.record.store_generation
    return {GENERATION_HEADER: str(gen)} if gen is not None else {}


def _usage(res) -> dict:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
            "total_tokens": res.prompt_tokens + res.completion_tokens}


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def build_router(door) -> APIRouter:
    server = door.server
    router = APIRouter()

    def engine():
        door.check_open()
        if server.engine is None:
            raise HttpError(503, "the model is still loading; retry shortly")
        return server.engine

    def common(body: dict, request: Request):
        check_generation_access(server, request.headers.get("authorization"))
        eng = engine()
        model = body.get("model")
        if model is not None and model not in (model_id(server), "silo"):
            raise HttpError(404, f"model: '{model}' is not served here; GET /v1/models lists "
                                 f"'{model_id(server)}'", "model", "model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("stream", "must be true or false")
        opts = body.get("stream_options") or {}
        return eng, stream, bool(isinstance(opts, dict) and opts.get("include_usage"))

    async def run(request: Request, req, chat: bool, stream: bool, include_usage: bool, eng):
        job = eng.generate(req)  # EngineBusy (429) and EngineClosed (503) here, before any byte is sent
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + job.id
        obj = "chat.completion" if chat else "text_completion"
        events = job.stream()

        def next_event():
            return next(events, None)

        try:
            # the first event before the response starts, so a request refused on the worker (a prompt
            # over the context, say) still gets its status code and not a broken stream
            first = await run_in_threadpool(next_event)
        except BaseException:
            eng.cancel(job)
            raise
        if not stream:
            event, checked = first, time.monotonic()
            try:
                while event[0] != "done":
                    if time.monotonic() - checked > 0.2:  # a client that gave up frees the worker within a step
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            eng.cancel(job)
                    event = await run_in_threadpool(next_event)
            except BaseException:
                eng.cancel(job)
                raise
            res = event[1]
            choice = {"index": 0, "finish_reason": FINISH.get(res.finish_reason, "stop"),
                      "silo": silo_extension(res, job.id)}
            if chat:
                choice["message"] = {"role": "assistant", "content": res.text}
            else:
                choice.update(text=res.text, logprobs=None)
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_id(server),
                                 "choices": [choice], "usage": _usage(res)}, headers=generation_header(job))

        def chunk(choice: dict | None, **extra) -> bytes:
            return _sse({"id": rid, "object": obj + ".chunk" if chat else obj, "created": created,
                         "model": model_id(server), "choices": [choice] if choice else [], **extra})

        async def sse():
            event = first
            try:
                if chat:
                    yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                while event is not None:
                    kind, value = event
                    if kind == "delta":
                        delta = {"content": value} if chat else {"text": value, "logprobs": None}
                        yield chunk({"index": 0, **({"delta": delta} if chat else delta), "finish_reason": None})
                    else:
                        last = {"index": 0, "finish_reason": FINISH.get(value.finish_reason, "stop"),
                                "silo": silo_extension(value, job.id)}
                        last.update({"delta": {}} if chat else {"text": "", "logprobs": None})
                        yield chunk(last)
                        if include_usage:
                            yield chunk(None, usage=_usage(value))
                        break
                    event = await run_in_threadpool(next_event)
                yield b"data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - after the headers: an error event ends the stream
                from .errors import http_error

                yield _sse(http_error(exc).body())
            finally:
                eng.cancel(job)  # the client went away (or the job ended: then a no-op)

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **generation_header(job)})

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise bad("prompt", "must be a string (or a list of one string)")
        req = complete_request(pb.CompleteRequest(prompt=prompt, params=gen_params(body, chat=False)), server.limits())
        return await run(request, req, False, stream, include_usage, eng)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise bad("messages", "must be a list of {role, content} objects")
        msgs = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(x, dict) and x.get("type") == "text" for x in content):
                    raise bad(f"messages[{i}].content", "only text content parts are supported")
                content = "".join(str(x.get("text", "")) for x in content)
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
                raise bad(f"messages[{i}]", "must be an object with a string role and content")
            msgs.append(pb.ChatMessage(role=m["role"], content=content))
        req = chat_request(pb.ChatRequest(messages=msgs, params=gen_params(body, chat=True)), server.limits())
        return await run(request, req, True, stream, include_usage, eng)

    @router.get("/v1/models")
    async def models(request: Request):
        engine()
        lm = server.engine.lm
        info = {"context_length": lm.context_length, "fingerprint": lm.fingerprint,
                "store_generation": lm.store.generation if lm.store is not None else None}
        return {"object": "list", "data": [{"id": model_id(server), "object": "model", "created": 0,
                                            "owned_by": "silo", "silo": info}]}

    return router
