"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (server-sent events when `stream`), /v1/models.

A request body is turned into silo.v1 request messages and validated by the same code as the gRPC door
(serving/requests.py), then enqueued on the same Engine; a rejection names the field as the body spells
it. SILO's extras ride in each choice as `choice["silo"]`:

    {"attributions": [...], "notices": [...], "guard_events": [...], "mode": "knn", "store_generation": 2,
     "request_id": "g000042", "logprobs": {"token_ids": [...], "lmbda": [...], "logprob_parametric": [...]}}

with the same fields as silo.v1's CompleteResponse (attributions when `return_attributions`, default true;
the per-token fields when log-probs were asked for). Non-standard request fields (mode, k, lmbda, tau,
top_k, return_attributions, max_verbatim_chars, exclude_owners, exclude_tiers, require_notices) go at the
top level of the body (`extra_body` in the openai client).

One call may ask for several generations: a batch of prompts (`prompt` as a list of strings or of token-id
lists), `n` choices each, `best_of` candidates each of which the `n` with the highest mean token
log-probability are returned. Each generation is one engine job (queued all or none); choice i * n + j is
prompt i's j-th. With `echo` the prompt comes back before the completion with its own log-probs, scored as
Score scores a text; `max_tokens: 0` with `echo` generates nothing (lm-eval's log-likelihoods).
"""

from __future__ import annotations

import dataclasses
import json
import math

from fastapi import APIRouter, Request

from silo.model.request import GenerationRequest

from ..auth import check_generation_access
from ..gen import silo_pb2 as pb
from ..requests import chat_request, complete_request
from .answers import Call, CallRunner, model_id
from .errors import HttpError, bad

_INTS = ("max_tokens", "top_k", "seed", "k", "max_verbatim_chars")
_FLOATS = ("temperature", "top_p", "lmbda", "tau")
_UNSUPPORTED = {"suffix": (None, ""), "tools": (None, []), "functions": (None, [])}


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
    except RecursionError:
        raise HttpError(400, "the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    check_json_values(body)
    return body


MAX_JSON_DEPTH = 16


def check_json_values(value, path: str = "", depth: int = 0) -> None:
    """400 for a body nested deeper than any request needs, or holding a string that is not text (a lone
    surrogate escape such as \\ud800, which no UTF-8 encoder takes), naming where."""
    if depth > MAX_JSON_DEPTH:
        raise bad(path or "body", f"nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise bad(path or "body", "holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_json_values(k, path or "body", depth + 1)
            check_json_values(v, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json_values(v, f"{path}[{i}]", depth + 1)


# ------------------------------------------------------------------------------------------ request fields
def gen_params(body: dict, chat: bool) -> pb.GenerationParams:
    """The body's sampling, SILO and log-prob fields as silo.v1 GenerationParams; type errors name the field."""
    p = pb.GenerationParams(return_attributions=True)
    if chat and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    _numbers(p, body)
    _string_lists(p, body)
    for name in ("return_attributions", "require_notices"):
        if body.get(name) is not None:
            setattr(p, name, _bool(body, name))
    if body.get("mode") is not None:
        if not isinstance(body["mode"], str):
            raise bad("mode", "must be a string")
        p.mode = body["mode"]
    for name, allowed in _UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise bad(name, "not supported by this server")
    (_chat_logprobs if chat else _completion_logprobs)(p, body)
    return p


def _bool(body: dict, name: str) -> bool:
    if not isinstance(body[name], bool):
        raise bad(name, "must be true or false")
    return body[name]


def _numbers(p: pb.GenerationParams, body: dict) -> None:
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


def _string_lists(p: pb.GenerationParams, body: dict) -> None:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    for name, value in (("stop", stop), ("exclude_owners", body.get("exclude_owners")),
                        ("exclude_tiers", body.get("exclude_tiers"))):
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise bad(name, "must be a list of strings" + (" or a string" if name == "stop" else ""))
        getattr(p, name).extend(value)


def _small_int(body: dict, name: str) -> int:
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
        raise bad(name, f"must be a non-negative integer (got {json.dumps(v)})")
    return v


def _completion_logprobs(p: pb.GenerationParams, body: dict) -> None:
    """Completions: `logprobs` N (alternatives per token), `echo`."""
    if body.get("logprobs") is not None:
        p.logprobs = _small_int(body, "logprobs")
    if body.get("echo") is not None:
        p.echo = _bool(body, "echo")
    if body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "belongs to chat completions; completions take logprobs: N")


def _chat_logprobs(p: pb.GenerationParams, body: dict) -> None:
    """Chat: `logprobs` true/false, `top_logprobs` N (needs logprobs true)."""
    wanted = body.get("logprobs") is not None and _bool(body, "logprobs")
    top = _small_int(body, "top_logprobs") if body.get("top_logprobs") is not None else None
    if top is not None and not wanted:
        raise bad("top_logprobs", "needs logprobs: true")
    if wanted:
        p.logprobs = top or 0
    if body.get("echo") not in (None, False):
        raise bad("echo", "not supported by chat completions")


def choice_counts(body: dict, chat: bool, stream: bool) -> tuple[int, int]:
    """(n, best_of): choices returned per prompt and candidates generated for them."""
    n = _small_int(body, "n") if body.get("n") is not None else 1
    if n < 1:
        raise bad("n", "must be >= 1")
    if body.get("best_of") is None:
        return n, n
    if chat:
        raise bad("best_of", "not supported by chat completions")
    best_of = _small_int(body, "best_of")
    if best_of < n:
        raise bad("best_of", f"must be >= n ({n}) (got {best_of})")
    if stream and best_of > n:
        raise bad("best_of", "cannot be used with stream (the best candidates are known only at the end)")
    return n, best_of


def completion_prompts(body: dict) -> list[dict]:
    """`prompt` as a list of prompts, each {"prompt": text} or {"prompt_ids": [ids]}: a string, a list of
    strings, a list of token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise bad("prompt", "must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if all(_is_id(x) for x in prompt):
        return [{"prompt_ids": prompt}]
    out = []
    for i, x in enumerate(prompt):
        if isinstance(x, str):
            out.append({"prompt": x})
        elif isinstance(x, list) and x and all(_is_id(t) for t in x):
            out.append({"prompt_ids": x})
        else:
            raise bad(f"prompt[{i}]", "must be a string or a non-empty list of token ids (integers >= 0)")
    return out


def _is_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31


def chat_messages(body: dict) -> list[pb.ChatMessage]:
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
    return msgs


def _seeded(req: GenerationRequest, j: int) -> GenerationRequest:
    """Candidate j of a prompt: with a seed, the seed + j (the same request gives the same choices again)."""
    if j == 0 or req.sampling.seed is None:
        return req
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, seed=(req.sampling.seed + j) % 2**63))


def completion_call(body: dict, server, stream: bool, include_usage: bool) -> Call:
    params = gen_params(body, chat=False)
    n, best_of = choice_counts(body, chat=False, stream=stream)
    prompts = completion_prompts(body)
    _check_choices(server, len(prompts), best_of, "best_of" if body.get("best_of") is not None else "n")
    asked = params.logprobs if params.HasField("logprobs") else None
    if best_of > n and asked is None:
        params.logprobs = 0  # the candidates are ranked by their tokens' log-probs
    limits, requests = server.limits(), []
    for i, prompt in enumerate(prompts):
        try:
            req = complete_request(pb.CompleteRequest(params=params, **prompt), limits)
        except Exception as exc:
            raise _batch_field(exc, i, len(prompts)) from None
        requests += [_seeded(req, j) for j in range(best_of)]
    return Call(False, requests, n, best_of, asked, params.echo, stream, include_usage)


def chat_call(body: dict, server, stream: bool, include_usage: bool) -> Call:
    params = gen_params(body, chat=True)
    n, _ = choice_counts(body, chat=True, stream=stream)
    _check_choices(server, 1, n, "n")
    req = chat_request(pb.ChatRequest(messages=chat_messages(body), params=params), server.limits())
    asked = params.logprobs if params.HasField("logprobs") else None
    return Call(True, [_seeded(req, j) for j in range(n)], n, n, asked, False, stream, include_usage)


def _check_choices(server, prompts: int, best_of: int, field: str) -> None:
    limit = min(server.cfg.max_choices, server.cfg.max_queue)  # each generation is a job in the queue
    if prompts * best_of > limit:
        field = "prompt" if best_of == 1 else field
        raise bad(field, f"{prompts} prompt(s) x {best_of} candidate(s) = {prompts * best_of} generations; at "
                         f"most {limit} per request (serve.max_choices, serve.max_queue)")


def _batch_field(exc: Exception, i: int, count: int) -> Exception:
    """A refused prompt of a batch names its index (prompt[2])."""
    field = getattr(exc, "field", None)
    if count > 1 and field in ("prompt", "prompt_ids"):
        return bad(f"prompt[{i}]", getattr(exc, "reason", None) or str(exc))
    return exc


# ------------------------------------------------------------------------------------------ routes
def build_router(door) -> APIRouter:
    server = door.server
    router = APIRouter()

    def engine():
        door.check_open()
        if server.engine is None:
            raise HttpError(503, "the model is still loading; retry shortly")
        return server.engine

    def common(body: dict, request: Request):
        client(request)
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

    def client(request: Request) -> str:
        """Who asks, once they may generate: a token's name, else the peer's address (fair queueing)."""
        peer = request.client.host if request.client else ""
        name = check_generation_access(server, request.headers.get("authorization"), peer)
        return name or peer

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        call = completion_call(body, server, stream, include_usage)
        return await CallRunner(server, request, eng, call, client(request)).run()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        call = chat_call(body, server, stream, include_usage)
        return await CallRunner(server, request, eng, call, client(request)).run()

    @router.get("/v1/models")
    async def models(request: Request):
        client(request)
        engine()
        lm = server.engine.lm
        info = {"context_length": lm.context_length, "fingerprint": lm.fingerprint,
                "store_generation": lm.store.generation if lm.store is not None else None}
        return {"object": "list", "data": [{"id": model_id(server), "object": "model", "created": 0,
                                            "owned_by": "silo", "silo": info}]}

    return router
