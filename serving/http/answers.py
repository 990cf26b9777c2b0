"""How one OpenAI-door call runs and is answered: a `Call` (its generations, one engine job each, and what
the answer shows), run on the engine by `CallRunner`, answered whole (JSON) or as server-sent events, one
`ChoiceStream` per choice. The request side (fields, prompts, choices) is serving/http/openai_api.py."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from silo.model.output_policy import disclosed
from silo.model.request import GenerationRequest

from ..auth import viewer
from ..messages import completion_message
from .convert import as_dict
from .logprobs import chat_logprobs, completion_logprobs, joined, silo_token_fields

FINISH = {"stop": "stop", "length": "length", "cancelled": "length"}
GENERATION_HEADER = "x-silo-store-generation"


def generation_header(jobs: list) -> dict:
    """The store generation the call's generations were admitted on (known before the first token is
    sent): the oldest, should a swap have come between two of a batch's admissions."""
    gens = [job.record.store_generation for job in jobs if job.record.store_generation is not None]
    return {GENERATION_HEADER: str(min(gens))} if gens else {}


def model_id(server) -> str:
    return Path(server.cfg.model).name


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

    def __init__(self, server, request: Request, eng, call: Call, client: str = ""):
        self.server, self.request, self.eng, self.call, self.client = server, request, eng, call, client
        self.viewer = viewer(server, request.headers.get("authorization"))
        self.model = model_id(server)
        self.created = int(time.time())
        self.object = "chat.completion" if call.chat else "text_completion"
        self.jobs: list = []
        self.events: list[_Events] = []

    async def run(self):
        self.jobs = self.eng.generate_all(self.call.requests, client=self.client)  # EngineBusy (429) and EngineClosed (503) here
        self.events = [_Events(job) for job in self.jobs]
        self.id = ("chatcmpl-" if self.call.chat else "cmpl-") + self.jobs[0].id
        try:
            # the first event before the response starts, so a request refused on the worker (a prompt over
            # the context, say) still gets its status code and not a broken stream
            first = await self.events[0].next()
            if self.call.stream:
                return StreamingResponse(self._sse(first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                  **generation_header(self.jobs)})
            results = [await _result(self.request, self.eng, ev, self.jobs, first if i == 0 else None)
                       for i, ev in enumerate(self.events)]
        except BaseException:
            self._cancel()
            raise
        return JSONResponse(self._body(results), headers=generation_header(self.jobs))

    def _shown(self, job, res):
        """A result as this caller may see it: supporting text within its documents' caps (output_policy)."""
        policy = job.request.output.policy(self.eng.policy)
        return dataclasses.replace(res, attributions=disclosed(res.attributions, policy, self.viewer.role,
                                                               self.viewer.name))

    def _cancel(self) -> None:
        for job in self.jobs:
            self.eng.cancel(job)

    def _body(self, results: list) -> dict:
        make = chat_choice if self.call.chat else completion_choice
        choices = [make(self.call, i, self._shown(self.jobs[c], results[c]), self.jobs[c].id)
                   for i, c in enumerate(self.call.chosen(results))]
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
                yield self._chunk(stream.last(self._shown(events.job, value), events.job.id))
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
