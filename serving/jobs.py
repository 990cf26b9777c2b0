"""What the serving engine hands back: a Job (its events, cancel flag and deadline), the record kept of it,
a generation's result, and the two refusals of new work."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from silo.model.types import Notice, SentenceAttribution, TokenLogprob

from silo.model.request import GenerationRequest

_ids = itertools.count(1)


class EngineBusy(RuntimeError):
    """The queue is full (RESOURCE_EXHAUSTED)."""


class EngineClosed(RuntimeError):
    """The engine is draining or stopped and accepts no new work (UNAVAILABLE)."""


@dataclass
class GenResult:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    mode: str
    store_generation: int | None
    # per-sentence sources, computed for every retrieval-mode generation (notices and the ledger need them);
    # sent to the client only when it asked (`return_attributions`)
    attributions: list[SentenceAttribution] = field(default_factory=list)
    return_attributions: bool = False
    notices: list[Notice] = field(default_factory=list)
    guard_events: list = field(default_factory=list)  # silo.model.guard.GuardEvent
    logprobs: list[TokenLogprob] | None = None  # the generated tokens' (request's OutputControls.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # the prompt's (OutputControls.echo)
    prompt_text: str | None = None


class TextDelta(str):
    """A piece of a completion's text that carries the log-probs of its tokens (when the request asked for
    them); deltas joined with + join both."""

    logprobs: tuple[TokenLogprob, ...] = ()

    def __new__(cls, text: str, logprobs=()):
        obj = super().__new__(cls, text)
        obj.logprobs = tuple(logprobs)
        return obj

    def __add__(self, other: str) -> "TextDelta":
        return TextDelta(str(self) + str(other), self.logprobs + tuple(getattr(other, "logprobs", ())))


@dataclass
class JobRecord:
    """What the engine did with one job (kept for the last few hundred jobs; tests and debugging read it)."""

    id: str
    kind: str
    finish_reason: str | None = None  # generations only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queued_s: float = 0.0
    run_s: float = 0.0
    error: str | None = None
    store_generation: int | None = None  # the datastore snapshot a generation was admitted on


class FairQueue:
    """The engine's waiting jobs, one line per client, served in turn: a client with many requests waiting
    does not make another client's request wait behind all of them."""

    def __init__(self):
        self._lines: dict[str, deque] = {}
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator["Job"]:
        return (job for line in list(self._lines.values()) for job in list(line))

    def waiting(self, client: str) -> int:
        line = self._lines.get(client)
        return len(line) if line else 0

    def append(self, job: "Job") -> None:
        self._lines.setdefault(job.client, deque()).append(job)
        self._n += 1

    def popleft(self) -> "Job":
        """The next client's oldest job; that client goes to the back of the turn."""
        client, line = next(iter(self._lines.items()))
        job = line.popleft()
        del self._lines[client]
        if line:
            self._lines[client] = line  # re-inserted: the end of the turn
        self._n -= 1
        return job

    def remove(self, job: "Job") -> None:
        line = self._lines.get(job.client)
        if line is None:
            raise ValueError("not queued")
        line.remove(job)  # ValueError when not there
        self._n -= 1
        if not line:
            del self._lines[job.client]


class Job:
    def __init__(self, kind: str, fn: Callable[["Job"], Any] | None, deadline: float | None = None,
                 prefix: str = "", client: str = ""):
        """`prefix`: the replica's name in a cluster; `client`: who asked (an API token's name or the
        peer's address), for fair queueing."""
        self.id = f"{prefix}{kind[:1]}{next(_ids):06d}"
        self.client = client
        self.kind = kind
        self.fn = fn
        self.deadline = deadline  # time.monotonic() value, or None
        self.created = time.monotonic()
        self.cancelled = threading.Event()
        # ("delta", str or TextDelta) ... then ("done", value) or ("error", exc)
        self.events: queue.Queue = queue.Queue()
        self.record = JobRecord(self.id, kind)
        self.request: GenerationRequest | None = None  # a generation's: admitted into the batch, not run as `fn`

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def emit(self, text: str, logprobs=()) -> None:
        self.events.put(("delta", TextDelta(text, logprobs) if logprobs else text))

    def stream(self, timeout: float | None = None) -> Iterator[tuple[str, Any]]:
        """("delta", text) events, then ("done", result); raises the job's error (queue.Empty on timeout). A
        request that echoes its prompt gets ("prompt", (text, log-probs)) first.

        Deltas that are already waiting when the reader comes back are joined into one: a reader that keeps
        up gets every token as it comes, one that falls behind (many streams on a busy host) sends fewer,
        longer messages instead of queueing latency. The text is the same either way."""
        while True:
            kind, value = self.events.get(timeout=timeout)
            while kind == "delta":  # join the deltas already waiting, up to the next other event
                try:
                    more = self.events.get_nowait()
                except queue.Empty:
                    break
                if more[0] != "delta":
                    yield kind, value
                    kind, value = more
                    break
                value += more[1]
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def result(self, timeout: float | None = None) -> Any:
        for kind, value in self.stream(timeout):
            if kind == "done":
                return value
