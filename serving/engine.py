"""The Engine: owns a SiloLM and runs all model work on ONE worker thread, with continuous batching.

The worker keeps a batch of active generations (`silo.model.batch.BatchDecoder`) and advances all of
them one token per step: one batched forward, one batched datastore search per shared retriever, then
per-sequence mixing, sampling, stop handling and streaming. Between two steps it runs control jobs
(datastore swaps), then admits queued requests while fewer than `max_batch` generate (the prompts of
those admitted together run as one prefill and join the batch); scoring and tokenising run there too,
one at a time.
Finished and cancelled generations leave the batch at once. gRPC threads only validate, enqueue and
stream results back; a bounded queue (`max_queue` waiting requests) turns overload into an immediate
RESOURCE_EXHAUSTED instead of unbounded latency.

The engine is a thin client of the model: a generation is `SiloLM.start(request)` on admission (prompt,
retriever, output policy, guard), a `BatchDecoder` step per token, and `SiloLM.finish` (attribution and
notices) when it leaves the batch; the engine schedules, batches, streams and counts, nothing more.
Every generation holds the retriever, and so the datastore snapshot, it was admitted with until it
finishes, attributions included; a swap between two steps applies to requests admitted after it.
kNN generations with the same settings on the same snapshot share one retriever object
(`SiloLM.retriever_for`), so their neighbours come from one search per step.

Cancellation: each job has a cancel flag (set when the client cancels or the RPC ends) and an optional
deadline, polled before every step, so a generation stops within one step. A job cancelled while still
queued is removed from the queue at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from silo.model.batch import BatchDecoder, Decoding
from silo.model.lm import SiloLM
from silo.model.output_policy import NO_POLICY, OutputPolicy
from silo.model.request import GenerationRequest
from silo.model.types import ScoreResult, SiloInputError

from .jobs import EngineBusy, EngineClosed, FairQueue, GenResult, Job, JobRecord
from .metrics import Metrics
from .requests import InvalidRequest, ScoreRequest

log = logging.getLogger("silo.serving.engine")


@dataclass
class RequestState:
    """What the engine keeps of one generation in the batch (the `tag` of its Decoding)."""

    job: Job
    admitted: float  # time.monotonic() when it joined: its run time counts from here
    awaiting_first_token: bool = True  # for the time-to-first-token metric
    logprobs: list = field(default_factory=list)  # of tokens whose text has not been streamed yet


@dataclass
class ScoreOutput:
    """A Score job's answer: the scores, and each token's text (decoded on the worker, where the tokenizer
    runs: HF fast tokenizers are not safe to call from several threads at once)."""

    result: ScoreResult
    token_texts: list[str]


class Engine:
    def __init__(self, lm: SiloLM, max_queue: int = 16, metrics: Metrics | None = None,
                 max_score_tokens: int = 4096, policy: OutputPolicy | None = None,
                 on_result: Callable[[str, GenResult], Any] | None = None, max_batch: int = 8, id_prefix: str = "",
                 max_queue_per_client: int | None = None):
        """`policy`: the operator's output controls; `on_result(request_id, result)` is called on the worker
        with every finished generation before its result is delivered (the server records it in the
        contribution ledger); a failure there is logged and does not fail the request. `id_prefix` starts every
        job id (a cluster replica's name, so request ids are unique across replicas). `max_queue_per_client`:
        the queue slots one client may hold (default: half the queue), and clients are served in turn."""
        self.lm = lm
        self.id_prefix = id_prefix
        self.policy = policy or NO_POLICY
        self.on_result = on_result
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client or max(1, max_queue // 2)
        self.max_batch = max(1, int(max_batch))
        self.decoder = BatchDecoder(lm)
        self.max_score_tokens = max_score_tokens
        self.metrics = metrics or Metrics()
        self.records: deque[JobRecord] = deque(maxlen=512)
        self._records_cv = threading.Condition()
        self._cv = threading.Condition()
        self._queue = FairQueue()
        self._control: deque[Job] = deque()
        self._accepting = True
        self._stopping = False
        self._busy = False
        self._worker = threading.Thread(target=self._run, name="silo-engine", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------- submission
    def _submit(self, job: Job, control: bool = False) -> Job:
        with self._cv:
            if not self._accepting and not control:
                raise EngineClosed("the server is shutting down; retry on another replica")
            if control:
                self._control.append(job)
            else:
                if len(self._queue) >= self.max_queue:
                    raise EngineBusy(f"queue full ({self.max_queue} requests waiting); retry later")
                if self._queue.waiting(job.client) >= self.max_queue_per_client:
                    raise EngineBusy(f"this client has {self.max_queue_per_client} requests waiting already (a "
                                     "client may hold part of the queue only); retry when one has run")
                self._queue.append(job)
                self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job`: dropped at once if still queued, else its generation stops at the next token."""
        job.cancelled.set()
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return  # running or finished: should_stop takes it from here
            self.metrics.queue_depth.set(len(self._queue))
        self._finish_unstarted(job)

    def generate(self, request: GenerationRequest, deadline: float | None = None, client: str = "") -> Job:
        job = Job("generate", None, deadline, self.id_prefix, client)
        job.request = request
        return self._submit(job)

    def generate_all(self, requests: list[GenerationRequest], deadline: float | None = None,
                     client: str = "") -> list[Job]:
        """The jobs of several generations one call asks for (HTTP: n, best_of, a batch of prompts), queued
        all or none: if the queue cannot take them all, those queued are cancelled and EngineBusy raised."""
        jobs: list[Job] = []
        try:
            for request in requests:
                jobs.append(self.generate(request, deadline, client))
        except BaseException:
            for job in jobs:
                self.cancel(job)
            raise
        return jobs

    def score(self, req: ScoreRequest, deadline: float | None = None, client: str = "") -> Job:
        return self._submit(Job("score", lambda job: self._score(req), deadline, self.id_prefix, client))

    def tokenize(self, text: str, client: str = "") -> Job:
        # on the worker too: HF fast tokenizers are not safe to call from several threads at once
        return self._submit(Job("tokenize", lambda job: self._tokenize(text), prefix=self.id_prefix, client=client))

    def control(self, fn: Callable[[], Any], timeout: float = 120.0) -> Any:
        """Run `fn` on the worker between requests (ahead of queued ones) and return its result."""
        job = self._submit(Job("control", lambda job: fn()), control=True)
        try:
            return job.result(timeout)
        except queue.Empty:
            job.cancelled.set()
            raise TimeoutError(f"the worker did not reach the control job within {timeout:.0f}s") from None

    def wait_record(self, pred: Callable[[JobRecord], bool], timeout: float = 30.0,
                    seen: Iterable[JobRecord] = ()) -> JobRecord:
        """The newest record of a finished job that matches `pred` and is not one of `seen`, as soon as
        there is one (TimeoutError after `timeout` s)."""
        old = {id(r) for r in seen}
        with self._records_cv:
            found: list[JobRecord] = []

            def match() -> bool:
                found[:] = [r for r in self.records if pred(r) and id(r) not in old]
                return bool(found)

            if not self._records_cv.wait_for(match, timeout):
                raise TimeoutError(f"no matching job record within {timeout:.0f}s")
            return found[-1]

    def _keep(self, record: JobRecord) -> None:
        with self._records_cv:
            self.records.append(record)
            self._records_cv.notify_all()

    # ------------------------------------------------------------------------------- lifecycle
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close_intake(self) -> None:
        with self._cv:
            self._accepting = False

    def drain(self, timeout: float) -> bool:
        """Stop accepting work and wait up to `timeout` s for queued and running jobs; True if all finished.

        Whatever is left after the grace period is cancelled (generations end with finish_reason cancelled).
        """
        self.close_intake()
        end = time.monotonic() + timeout
        with self._cv:
            while (self._queue or self._control or self._busy) and time.monotonic() < end:
                self._cv.wait(timeout=max(0.01, min(0.1, end - time.monotonic())))
            clean = not (self._queue or self._control or self._busy)
            leftover = list(self._queue)
        for job in leftover:
            self.cancel(job)
        if not clean:
            self._cancel_running()
        return clean

    def stop(self, timeout: float = 5.0) -> None:
        self.drain(0.0)
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._worker.join(timeout)

    def _cancel_running(self) -> None:
        for seq in list(self.decoder.seqs):
            seq.tag.job.cancelled.set()

    # ------------------------------------------------------------------------------- worker
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._control or self._queue or self._stopping or self.decoder.active):
                    self._cv.wait()
                if self._stopping and not (self._control or self._queue or self.decoder.active):
                    return
                controls = list(self._control)
                self._control.clear()
                admitted = []
                while self._queue and self.decoder.active + len(admitted) < self.max_batch:
                    admitted.append(self._queue.popleft())
                self.metrics.queue_depth.set(len(self._queue))
                self._busy = True
            try:
                for job in controls:
                    self._execute(job)
                joining = []
                for job in admitted:
                    if job.kind == "generate":
                        seq = self._admit(job)
                        if seq is not None:
                            joining.append(seq)
                    else:
                        self._execute(job)
                self._join(joining)
                if self.decoder.active:
                    self._step()
            except Exception:  # noqa: BLE001 - a step that fails ends the batch's requests, not the worker
                log.exception("batch step failed")
                self._fail_batch()
            finally:
                with self._cv:
                    self._busy = bool(self.decoder.active)
                    self.metrics.batch_size.set(self.decoder.active)
                    self._cv.notify_all()

    def _execute(self, job: Job) -> None:
        start = time.monotonic()
        job.record.queued_s = start - job.created
        if job.should_stop():
            self._finish_unstarted(job)
            return
        try:
            value = job.fn(job)
        except Exception as exc:  # noqa: BLE001 - delivered to the caller, who maps it to a status
            job.record.run_s = time.monotonic() - start
            self._fail(job, exc)
        else:
            self._answer(job, value, start)

    def _finish_unstarted(self, job: Job) -> None:
        """A job cancelled or past its deadline before it ran: answer without touching the model."""
        if job.kind == "generate":
            job.record.finish_reason = "cancelled"
            self.metrics.finish.labels("cancelled").inc()
            job.events.put(("done", GenResult("", "cancelled", 0, 0, "", None)))
        else:
            job.events.put(("error", TimeoutError("cancelled before it ran")))
        self._keep(job.record)

    # ------------------------------------------------------------------------------- model work
    def _admit(self, job: Job) -> Decoding | None:
        """Set up a generation (its prompt runs in `_join`); None when it was answered here. The retriever
        holds the snapshot this request uses throughout, attributions included."""
        job.record.queued_s = time.monotonic() - job.created
        if job.should_stop():
            self._finish_unstarted(job)
            return None
        try:
            self._check_scoring_size(job.request)
            seq = self.lm.start(job.request, policy=self.policy, should_stop=job.should_stop)
        except Exception as exc:  # noqa: BLE001 - delivered to the caller, who maps it to a status
            self._fail(job, exc)
            return None
        seq.tag = RequestState(job, time.monotonic())
        store = seq.retriever.store if seq.retriever is not None else self.lm.store
        job.record.store_generation = store.generation if store is not None else None
        if seq.echo is not None:  # the prompt's text and log-probs, ahead of the completion's deltas
            job.events.put(("prompt", seq.echo))
        return seq

    def _join(self, seqs: list[Decoding]) -> None:
        """Run the prompts of the generations admitted together and put them in the batch (one joint prefill;
        if that fails, each alone, so a failure is its own request's)."""
        if not seqs:
            return
        try:
            self.decoder.add_many(seqs)
            joined = seqs
        except Exception as exc:  # noqa: BLE001 - retried one by one below
            if len(seqs) == 1:
                self._fail(seqs[0].tag.job, exc)
                return
            log.exception("joint prefill of %d generations failed; running them one by one", len(seqs))
            joined = []
            for seq in seqs:
                try:
                    self.decoder.add(seq)
                    joined.append(seq)
                except Exception as exc:  # noqa: BLE001
                    self._fail(seq.tag.job, exc)
        for seq in joined:
            self._deliver(seq)
            if seq.done:
                self._complete(seq)

    def _step(self) -> None:
        t0 = time.monotonic()
        finished = self.decoder.step()
        self.metrics.steps.inc()
        self.metrics.generation_seconds.inc(time.monotonic() - t0)
        for seq in list(self.decoder.seqs) + finished:
            self._deliver(seq)
        for seq in finished:
            self._complete(seq)

    def _check_scoring_size(self, request: GenerationRequest) -> None:
        """A request that only scores its prompt may be longer than the context (it is read in windows), up to
        what Score accepts."""
        if not request.scores_only:
            return
        n = len(request.prompt_ids) if request.prompt_ids is not None else None
        if n is None and request.prompt is not None:
            n = len(self.lm.encode(request.prompt)) + 1
        if n is not None and n > self.max_score_tokens + 1:
            raise InvalidRequest("prompt", f"{n} tokens; a prompt scored alone (echo, max_tokens 0) may have at "
                                           f"most {self.max_score_tokens}, as Score")

    def _deliver(self, seq: Decoding) -> None:
        state: RequestState = seq.tag
        for step in seq.take():
            if step.logprob is not None:
                state.logprobs.append(step.logprob)
            if step.text:
                if state.awaiting_first_token:
                    self.metrics.ttft.observe(time.monotonic() - state.job.created)
                    state.awaiting_first_token = False
                state.job.emit(step.text, state.logprobs)
                state.logprobs = []

    def _complete(self, seq: Decoding) -> None:
        """A generation left the batch: attribute it, answer, count it."""
        state: RequestState = seq.tag
        job = state.job
        try:
            comp = self.lm.finish(seq)
            n = len(comp.tokens)
            self.metrics.tokens.inc(n)
            self.metrics.finish.labels(comp.finish_reason).inc()
            job.record.finish_reason = comp.finish_reason
            job.record.prompt_tokens, job.record.completion_tokens = comp.prompt_tokens, n
            result = GenResult(text=comp.text, finish_reason=comp.finish_reason, prompt_tokens=comp.prompt_tokens,
                               completion_tokens=n, mode=comp.mode, store_generation=comp.store_generation,
                               attributions=comp.attributions, return_attributions=job.request.output.attributions,
                               notices=comp.notices, guard_events=comp.guard_events, logprobs=comp.logprobs,
                               prompt_logprobs=comp.prompt_logprobs, prompt_text=comp.prompt_text)
            self._report(job, result)
        except Exception as exc:  # noqa: BLE001
            self._fail(job, exc)
            return
        self._answer(job, result, state.admitted)

    def _answer(self, job: Job, value, start: float) -> None:
        job.record.run_s = time.monotonic() - start
        self._keep(job.record)
        job.events.put(("done", value))

    def _fail(self, job: Job, exc: Exception) -> None:
        if not isinstance(exc, SiloInputError):  # (InvalidRequest is one: the caller named the field)
            log.error("job %s (%s) failed", job.id, job.kind, exc_info=exc)
        job.record.error = f"{type(exc).__name__}: {exc}"
        self._keep(job.record)
        job.events.put(("error", exc))

    def _fail_batch(self) -> None:
        seqs, self.decoder = list(self.decoder.seqs), BatchDecoder(self.lm)
        for seq in seqs:
            self._fail(seq.tag.job, RuntimeError("the generation step failed; see the server log"))

    def _report(self, job: Job, result: GenResult) -> None:
        """Hand a finished generation to `on_result` (the contribution ledger), on the worker."""
        if self.on_result is None or result.finish_reason == "cancelled" and not result.completion_tokens:
            return
        if job.request is not None and job.request.scores_only:  # a prompt scored (echo): nothing was generated
            return
        try:
            self.on_result(job.id, result)
        except Exception:  # noqa: BLE001 - accounting must not take the response down; it is logged
            log.exception("recording job %s in the ledger failed", job.id)
            self.metrics.ledger_errors.inc()

    def _score(self, req: ScoreRequest) -> ScoreOutput:
        n = len(self.lm.encode(req.text))
        if n > self.max_score_tokens:
            raise InvalidRequest("text", f"{n} tokens; Score accepts at most {self.max_score_tokens}")
        res = self.lm.score(req.text, self.lm.retriever_for(req.retrieval))[0]  # (lambda per token included)
        return ScoreOutput(res, [self.lm.tokenizer.decode([t]) for t in res.tokens])

    def _tokenize(self, text: str) -> tuple[list[int], list[str]]:
        ids = self.lm.encode(text)
        return ids, [self.lm.tokenizer.decode([i]) for i in ids]
