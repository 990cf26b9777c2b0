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
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from silo.model.request import GenerationRequest

from ..auth import check_generation_access
from ..gen import silo_pb2 as pb
from ..messages import completion_message
from ..requests import chat_request, complete_request
from .convert import as_dict
from .errors import HttpError, bad
from .logprobs import chat_logprobs, completion_logprobs, joined, silo_token_fields

FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}
_INTS = ("max_tokens", "top_k", "seed", "k", "max_verbatim_chars")
_FLOATS = ("temperature", "top_p", "lmbda", "tau")
_UNSUPPORTED = {"suffix": (None, ""), "tools": (None, []), "functions": (None, [])}


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


# ------------------------------------------------------------------------------------------ one call
@dataclass
class Call:
    """One HTTP generation call: its generations (prompts x candidates, one engine job each) and what its
    answer shows."""

    chat: bool
    requests: list[GenerationRequest]
    n: int
    best_of: int
    logprobs: int | None  # alternatives per token the caller asked for (None: no log-probs)
    echo: bool
    stream: bool
    include_usage: bool

    @property
    def prompts(self) -> int:
        return len(self.requests) // self.best_of

    def chosen(self, results: list) -> list[int]:
        """The results returned, in choice order: per prompt, its n candidates with the highest mean token
        log-probability (all of them when best_of == n)."""
        out = []
        for i in range(self.prompts):
            cands = list(range(i * self.best_of, (i + 1) * self.best_of))
            if self.best_of > self.n:
                cands = sorted(cands, key=lambda c: -_mean_logprob(results[c]))[:self.n]
                cands.sort()
            out += cands
        return out

    def usage(self, results: list) -> dict:
        """As OpenAI counts: each prompt once, every generated candidate's tokens (best_of's too)."""
        prompt = sum(results[i * self.best_of].prompt_tokens for i in range(self.prompts))
        completion = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _mean_logprob(res) -> float:
    lps = [t.logprob for t in res.logprobs or () if t.logprob is not None]
    return sum(lps) / len(lps) if lps else 0.0


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


# ------------------------------------------------------------------------------------------ answers
def silo_extension(res, request_id: str) -> dict:
    """The `silo` field of a choice: silo.v1 CompleteResponse's attributions, notices and guard events."""
    msg = as_dict(completion_message(dataclasses.replace(res, logprobs=None, prompt_logprobs=None), request_id))
    return {"attributions": msg["attributions"], "notices": msg["notices"], "guard_events": msg["guard_events"],
            "mode": res.mode, "store_generation": res.store_generation, "request_id": request_id}


def completion_choice(call: Call, index: int, res, request_id: str) -> dict:
    prompt = (res.prompt_text or "") if call.echo else ""
    choice = {"index": index, "text": prompt + res.text, "logprobs": None,
              "finish_reason": FINISH.get(res.finish_reason, "stop"), "silo": silo_extension(res, request_id)}
    if call.logprobs is not None:
        shown = list(res.prompt_logprobs or []) if call.echo else []
        choice["logprobs"] = joined([completion_logprobs(shown), completion_logprobs(res.logprobs or [], len(prompt))])
        choice["silo"]["logprobs"] = silo_token_fields(shown + list(res.logprobs or []))
    return choice


def chat_choice(call: Call, index: int, res, request_id: str) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": res.text}, "logprobs": None,
              "finish_reason": FINISH.get(res.finish_reason, "stop"), "silo": silo_extension(res, request_id)}
    if call.logprobs is not None:
        tokens = (res.logprobs or [])[:res.completion_tokens]  # the end-of-text token is not content
        choice["logprobs"] = chat_logprobs(tokens, call.logprobs)
        choice["silo"]["logprobs"] = silo_token_fields(tokens)
    return choice


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class _Events:
    """The events of one job, read off the event loop (each `next` waits in a worker thread)."""

    def __init__(self, job):
        self.job, self._events = job, job.stream()

    async def next(self):
        return await run_in_threadpool(next, self._events, None)


async def _result(request: Request, eng, events: _Events, jobs: list, first=None):
    """A job's result, cancelling every job of the call if the client goes away meanwhile."""
    event, checked = first or await events.next(), time.monotonic()
    while event is not None and event[0] != "done":
        if time.monotonic() - checked > 0.2:  # a client that gave up frees the worker within a step
            checked = time.monotonic()
            if await request.is_disconnected():
                for job in jobs:
                    eng.cancel(job)
        event = await events.next()
    return event[1]


class CallRunner:
    """Runs one Call on the engine and answers it, whole (JSON) or as server-sent events."""

    def __init__(self, server, request: Request, eng, call: Call):
        self.server, self.request, self.eng, self.call = server, request, eng, call
        self.model = model_id(server)
        self.created = int(time.time())
        self.object = "chat.completion" if call.chat else "text_completion"
        self.jobs: list = []
        self.events: list[_Events] = []

    async def run(self):
        self.jobs = self.eng.generate_all(self.call.requests)  # EngineBusy (429) and EngineClosed (503) here
        self.events = [_Events(job) for job in self.jobs]
        self.id = ("chatcmpl-" if self.call.chat else "cmpl-") + self.jobs[0].id
        try:
            # the first event before the response starts, so a request refused on the worker (a prompt over
            # the context, say) still gets its status code and not a broken stream
            first = await self.events[0].next()
            if self.call.stream:
                return StreamingResponse(self._sse(first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            results = [await _result(self.request, self.eng, ev, self.jobs, first if i == 0 else None)
                       for i, ev in enumerate(self.events)]
        except BaseException:
            self._cancel()
            raise
        return JSONResponse(self._body(results))

    def _cancel(self) -> None:
        for job in self.jobs:
            self.eng.cancel(job)

    def _body(self, results: list) -> dict:
        make = chat_choice if self.call.chat else completion_choice
        choices = [make(self.call, i, results[c], self.jobs[c].id) for i, c in enumerate(self.call.chosen(results))]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": self.call.usage(results)}

    def _chunk(self, choice: dict | None, **extra) -> bytes:
        return _sse({"id": self.id, "object": self.object + ".chunk" if self.call.chat else self.object,
                     "created": self.created, "model": self.model, "choices": [choice] if choice else [], **extra})

    async def _sse(self, first):
        results = []
        try:
            for index, events in enumerate(self.events):  # n > 1, a batch: the choices one after another
                async for piece in self._choice_stream(index, events, first if index == 0 else None, results):
                    yield piece
            if self.call.include_usage:
                yield self._chunk(None, usage=self.call.usage(results))
            yield b"data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - after the headers: an error event ends the stream
            from .errors import http_error

            yield _sse(http_error(exc).body())
        finally:
            self._cancel()  # the client went away (or the jobs ended: then a no-op)

    async def _choice_stream(self, index: int, events: _Events, first, results: list):
        """One choice's chunks: (the echoed prompt,) its text deltas with their log-probs, its last chunk."""
        stream = ChoiceStream(self.call, index)
        event = first or await events.next()
        if self.call.chat:
            yield self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})
        while event is not None:
            kind, value = event
            if kind == "done":
                results.append(value)
                yield self._chunk(stream.last(value, events.job.id))
                return
            yield self._chunk(stream.prompt(value) if kind == "prompt" else stream.delta(value))
            event = await events.next()


class ChoiceStream:
    """The chunks of one streamed choice, from the job's events: its echoed prompt, text deltas (each with
    the log-probs of the tokens it carries) and the last chunk (finish reason, `silo`, log-probs not sent)."""

    def __init__(self, call: Call, index: int):
        self.call, self.index = call, index
        self.shift = 0  # the echoed prompt's length: completion offsets count from its end
        self.sent = 0  # log-probs of generated tokens sent so far

    def prompt(self, echo) -> dict:
        text, tokens = echo
        self.shift = len(text)
        shown = tokens if self.call.logprobs is not None else None
        return self._piece(text, shown, lambda t: completion_logprobs(t))

    def delta(self, value) -> dict:
        tokens = list(getattr(value, "logprobs", ()))
        self.sent += len(tokens)
        return self._piece(str(value), tokens if self.call.logprobs is not None else None, self._logprobs)

    def last(self, res, request_id: str) -> dict:
        make = chat_choice if self.call.chat else completion_choice
        full = make(self.call, self.index, res, request_id)
        rest = (res.logprobs or [])[self.sent:]
        if self.call.chat:
            rest = rest[:max(0, res.completion_tokens - self.sent)]
        out = self._piece("", rest if self.call.logprobs is not None else None, self._logprobs)
        out.update(finish_reason=full["finish_reason"], silo=full["silo"])
        if self.call.chat:
            out["delta"] = {}
        return out

    def _logprobs(self, tokens) -> dict:
        if self.call.chat:
            return chat_logprobs(tokens, self.call.logprobs)
        return completion_logprobs(tokens, self.shift)

    def _piece(self, text: str, tokens, shape) -> dict:
        out: dict = {"index": self.index}
        if self.call.chat:
            out["delta"] = {"content": text}
        else:
            out["text"] = text
        out["logprobs"] = shape(tokens) if tokens is not None else None
        if tokens:
            out["silo"] = {"logprobs": silo_token_fields(tokens)}
        out["finish_reason"] = None
        return out


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

    @router.post("/v1/completions")
    async def completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        call = completion_call(body, server, stream, include_usage)
        return await CallRunner(server, request, eng, call).run()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await json_body(request, door.body_limit)
        eng, stream, include_usage = common(body, request)
        call = chat_call(body, server, stream, include_usage)
        return await CallRunner(server, request, eng, call).run()

    @router.get("/v1/models")
    async def models(request: Request):
        engine()
        lm = server.engine.lm
        info = {"context_length": lm.context_length, "fingerprint": lm.fingerprint,
                "store_generation": lm.store.generation if lm.store is not None else None}
        return {"object": "list", "data": [{"id": model_id(server), "object": "model", "created": 0,
                                            "owned_by": "silo", "silo": info}]}

    return router
