"""SiloLM: a parametric LM that scores and generates, with or without a retriever.

Works with any Hugging Face causal LM. Keys are the input of the output layer (see
`silo.datastore.keys`): when the decoder returns exactly that tensor we run decoder and head ourselves
(thread-safe, no hooks); otherwise a forward pre-hook captures it under a lock.

Retrieval is an object passed in (`KNNRetriever`, `RICRetriever`, made by `SiloLM.retriever(mode, ...)`)
that holds the datastore snapshot it was made from, so a generation in flight keeps its snapshot while
`swap_store` attaches a new one for the next request (how removals reach a running server).

    lm = SiloLM.load("runs/demo/model", "runs/demo/store")
    knn = lm.retriever("knn", k=16, lmbda=0.5)
    ppl = lm.score(["some text"], knn)[0].perplexity
    comp = lm.complete("To be, or not", SamplingParams(max_new_tokens=32, temperature=0), knn)
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from silo.core.fingerprint import model_fingerprint
from silo.core.models import load_lm
from silo.datastore.blocks import BlockStore
from silo.datastore.keys import OutputInputCapture, decoder_matches_head_input, window_plan
from silo.datastore.store import Datastore, DatastoreError

from .attribution import attribute_steps
from .batch import BatchDecoder
from .batch import Sequence as Decoding
from .gate import Gate
from .guard import TokenTexts, VerbatimGuard
from .knn import FixedMixture, KNNConfig, KNNRetriever
from .output_policy import NO_POLICY, OutputPolicy, license_notices
from .ric import RICConfig, RICRetriever
from .sampling import SamplingParams
from .types import (
    CONTEXT, Completion, GenerationStep, LMState, PositionBatch, ScoreResult, SiloInputError, context_of,
)

MODES = ("parametric", "knn", "ric")  # ric: retrieval in context, silo/model/ric.py
log = logging.getLogger("silo.model")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _skip_threshold(skip: str | float, gate: Gate) -> float:
    """The retrieval-skipping threshold a setting means for `gate` ("auto": the one fitted with it)."""
    if skip == "off" or gate.skip is None:
        return 0.0
    if skip == "auto":
        return float(gate.skip.threshold)
    try:
        value = float(skip)
    except (TypeError, ValueError):
        raise SiloInputError(f"skip must be auto, off or a number in [0, 1] (got {skip!r})", "skip") from None
    if not 0.0 <= value <= 1.0:
        raise SiloInputError(f"skip must be auto, off or a number in [0, 1] (got {skip!r})", "skip")
    return value


def _cache_kwarg(model) -> str:
    """The name a model's forward takes its KV cache under: `cache` in newer transformers (which drop
    `past_key_values`, deprecated since 5.x), `past_key_values` before."""
    name = getattr(model, "_silo_cache_kwarg", None)
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"
        model._silo_cache_kwarg = name
    return name


def _cache_of(out):
    """The KV cache of a model output, under either name."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return None


class Generation:
    """The steps of one generation, streamed as they are made; `completion` is set once they are all out.

        gen = lm.generate(prompt, params, retriever)
        for step in gen: print(step.text, end="")
        gen.completion.finish_reason
    """

    def __init__(self, steps):
        self._steps = steps
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[GenerationStep]:
        self.completion = yield from self._steps


class SiloLM:
    def __init__(self, model, tokenizer, store: Datastore | None = None, knn: KNNConfig | None = None,
                 window: int | None = None, stride: int | None = None, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.knn = knn or KNNConfig()
        self.context_length = int(getattr(model.config, "max_position_embeddings", 1024) or 1024)
        self.window = min(window or self.context_length, self.context_length)
        self.stride = stride or max(1, self.window // 2)
        if self.stride > self.window:
            raise SiloInputError(f"stride ({self.stride}) must not exceed window ({self.window})", "stride")
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().out_features
        self.fingerprint = model_fingerprint(model, tokenizer)
        self._fast = decoder_matches_head_input(model)
        self._hook_lock = threading.Lock()
        self._store: Datastore | None = None
        self._blocks: tuple | None = None  # (store snapshot, dense model, BlockStore) for mode ric
        self._gate: tuple | None = None  # (store snapshot, Gate or None)
        self._token_texts: TokenTexts | None = None
        if store is not None:
            self.swap_store(store)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_path: str, store_path: str | None = None, knn: KNNConfig | None = None,
             device: str = "cpu", dtype: str | None = "auto", **kwargs) -> "SiloLM":
        """`device`: auto | cpu | cuda | cuda:N for the model (the store's index stays where it is opened:
        CPU FAISS unless the store is opened on cuda); `dtype`: auto (bfloat16/float16 on a GPU) or a torch
        dtype name."""
        model, tokenizer = load_lm(model_path, device, dtype)
        lm = cls(model, tokenizer, knn=knn, **kwargs)
        if store_path:
            lm.swap_store(Datastore.open(store_path, fingerprint=lm.fingerprint))
        return lm

    @property
    def store(self) -> Datastore | None:
        return self._store

    def swap_store(self, store: Datastore | None) -> Datastore | None:
        """Attach a new store snapshot (None detaches); returns the previous one."""
        if store is not None and store.fingerprint != self.fingerprint:
            raise DatastoreError(
                f"{store.path}: store fingerprint {store.fingerprint[:23]}... does not match the model's "
                f"{self.fingerprint[:23]}...; rebuild the store for this model")
        if store is not None:
            store.check_not_older(self._store)  # a stale snapshot must never come back after a removal
        old, self._store = self._store, store
        self._blocks = None  # the RIC block and gate caches belonged to the old snapshot
        self._gate = None
        return old

    def newer_store(self) -> Datastore | None:
        """The attached store's current generation on disk if it differs from the attached one, else None
        (opened, sharing unchanged shards, but not attached: a server opens off its worker, then swaps)."""
        cur = self._store
        if cur is None:
            return None
        new = Datastore.open(cur.path, fingerprint=self.fingerprint, device=cur.device, reuse=cur)
        return None if new.generation == cur.generation else new

    def reload_store(self) -> bool:
        """Pick up a newer generation of the attached store from disk; True if it changed."""
        new = self.newer_store()
        if new is not None:
            self.swap_store(new)
        return new is not None

    def blocks(self, dense_model: str | None = None) -> BlockStore:
        """The RIC block store of the attached snapshot (cached until the snapshot changes)."""
        store = self._store
        if store is None:
            raise SiloInputError("mode 'ric' needs a datastore with blocks; attach a store (store path) first", "mode")
        cached = self._blocks
        if cached is not None and cached[0] is store and cached[1] == dense_model:
            return cached[2]
        bs = BlockStore(store, dense_model)
        self._blocks = (store, dense_model, bs)
        return bs

    # ----------------------------------------------------------------------------------- retrievers
    def gate(self) -> Gate | None:
        """The gate fitted for the attached snapshot's store (gate.json), cached until the snapshot changes."""
        store = self._store
        if store is None:
            return None
        if self._gate is None or self._gate[0] is not store:
            self._gate = (store, Gate.load(store))
        return self._gate[1]

    def retriever(self, mode: str | None = "knn", k: int | None = None, lmbda: float | None = None,
                  tau: float | None = None, ric: RICConfig | dict | None = None, mixture: str | None = None,
                  skip: str | float | None = None, store: Datastore | None = None):
        """The retriever for `mode` over the attached snapshot (or `store`, another snapshot of the same
        model's store): None for parametric, `RICRetriever`, or a `KNNRetriever`. Its mixture is the store's
        fitted gate when the LM's kNN settings say "gated" (the default) and the store has one; giving k,
        lmbda or tau asks for the fixed mixture with those values (the others from the LM's
        settings). `skip` overrides the settings' retrieval skipping."""
        mode = mode or "parametric"
        if mode not in MODES:
            raise SiloInputError(f"mode must be one of {', '.join(MODES)} (got {mode!r})", "mode")
        if mode == "parametric":
            return None
        if store is not None and store is not self._store:
            if store.fingerprint != self.fingerprint:
                raise DatastoreError(f"{store.path}: the store was built for another model")
            gate = Gate.load(store)
        else:
            store, gate = self._store, self.gate()
        if store is None:
            raise SiloInputError(f"mode '{mode}' needs a datastore; attach one (store path) or use mode 'parametric'",
                                 "mode")
        if mode == "ric":
            cfg = ric if isinstance(ric, RICConfig) else None
            return RICRetriever(self.blocks(cfg.dense_model if cfg else (ric or {}).get("dense_model")), ric)
        s = self.knn
        if mixture not in (None, "gated", "fixed"):
            raise SiloInputError(f"mixture must be gated or fixed (got {mixture!r})", "mixture")
        explicit = any(x is not None for x in (k, lmbda, tau))
        if (mixture or s.mixture) == "gated" and not explicit:
            if gate is not None:
                threshold = _skip_threshold(s.skip if skip is None else skip, gate)
                return KNNRetriever(store, gate, self.vocab_size, skip=gate.skip, skip_threshold=threshold,
                                    bos=self.tokenizer.eos_token_id)
            if mixture == "gated":
                raise SiloInputError(f"{store.path}: no gate fitted for this store; fit one with "
                                     "`silo datastore fit-gate` or use the fixed mixture", "mixture")
            _warn_once(f"{store.path}: no gate fitted for this store (silo datastore fit-gate); using the "
                       f"fixed mixture k={s.k} lambda={s.lmbda} tau={s.tau}")
        try:
            settings = KNNConfig(k=k if k is not None else s.k, lmbda=lmbda if lmbda is not None else s.lmbda,
                                 tau=tau if tau is not None else s.tau)
        except Exception as exc:
            raise SiloInputError(f"invalid kNN setting: {exc}", "knn") from None
        return KNNRetriever(store, FixedMixture(settings.k, settings.lmbda, settings.tau),
                            self.vocab_size, bos=self.tokenizer.eos_token_id)

    def guard(self, retriever, policy: OutputPolicy | None) -> VerbatimGuard | None:
        """A VerbatimGuard for ONE sequence generated with `retriever` under `policy`; None when there is
        nothing to guard (parametric mode, or no cap and no disallowed document in the policy)."""
        if retriever is None or policy is None or not policy.guarded:
            return None
        if self._token_texts is None:
            self._token_texts = TokenTexts.of(self.tokenizer, self.vocab_size)
        return VerbatimGuard(retriever.store, policy, self._token_texts)

    def _resolve(self, retriever):
        return self.retriever(retriever) if isinstance(retriever, str) or retriever is None else retriever

    # ----------------------------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, past=None,
                position_ids: torch.Tensor | None = None):
        """(hidden [B,T,d] float32, logits [B,T,V] float32, past) for a batch (`position_ids` for left-padded
        rows: each row's own positions)."""
        extra = {} if position_ids is None else {"position_ids": position_ids}
        extra[_cache_kwarg(self.model)] = past
        if self._fast:
            out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=past is not None, **extra)
            hidden = out.last_hidden_state
            logits = self.model.get_output_embeddings()(hidden)
            return hidden.float(), logits.float(), _cache_of(out)
        with self._hook_lock, OutputInputCapture(self.model) as cap:
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=past is not None, **extra)
            hidden = cap.value
        return hidden.float(), out.logits.float(), _cache_of(out)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str, field: str = "prompt") -> list[int]:
        """BOS + the prompt's tokens; refuses a prompt that leaves no room to generate."""
        ids = [self.tokenizer.eos_token_id] + self.encode(prompt)
        self.check_prompt(ids, field)
        return ids

    def check_prompt(self, ids: Sequence[int], field: str = "prompt") -> None:
        if len(ids) >= self.context_length:
            raise SiloInputError(f"{field}: {len(ids)} tokens (with BOS); the model's context is {self.context_length} "
                                 "tokens and at least one must be left to generate", field)

    def collect(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> PositionBatch:
        """Run the LM over texts in sliding windows; every token is scored once (first token after BOS).

        Window `self.window`, stride `self.stride`: the first window scores all its tokens, later windows
        only the last `stride` ones (SILO's protocol; 1,024/512 there, the model's context and half of it
        by default here).
        """
        bos = self.tokenizer.eos_token_id
        jobs = []  # (text index, begin, end, first_new)
        per_text_ids = []
        for ti, text in enumerate(texts):
            ids = [bos] + self.encode(text)
            per_text_ids.append(ids)
            for b, e, first_new in window_plan(len(ids) - 1, self.window, self.stride) if len(ids) > 1 else []:
                jobs.append((ti, b, e, first_new))
        targets, logps, keys, owners, states, contexts = [], [], [], [], [], []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(jobs), self.batch_size):
            chunk = jobs[i:i + self.batch_size]
            T = max(e - b for _, b, e, _ in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, (ti, b, e, _) in enumerate(chunk):
                ids[r, : e - b] = torch.tensor(per_text_ids[ti][b:e])
                mask[r, : e - b] = 1
            hidden, logits, _ = self.forward(ids.to(self.device), mask.to(self.device))
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, (ti, b, e, first_new) in enumerate(chunk):
                rows = slice(first_new - b, e - b)
                tgt = torch.tensor(per_text_ids[ti][first_new + 1: e + 1], dtype=torch.long)
                lp = logprobs[r, rows].gather(1, tgt.to(logprobs.device)[:, None])[:, 0]
                states.append(LMState.of(logprobs[r, rows]))
                contexts.append(np.stack([context_of(per_text_ids[ti], i) for i in range(first_new, e)]))
                targets.append(tgt.numpy())
                logps.append(lp.double().cpu().numpy())
                keys.append(hidden[r, rows].cpu().numpy())
                owners.append(np.full(len(tgt), ti, dtype=np.int32))
            if progress:
                progress(sum(e - f for _, _, e, f in chunk))
        if not targets:
            d = self.model.get_output_embeddings().in_features
            return PositionBatch(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, d), np.float32), np.zeros(0, np.int32),
                                 LMState.empty(), np.zeros((0, CONTEXT), np.int64))
        return PositionBatch(np.concatenate(targets), np.concatenate(logps),
                             np.ascontiguousarray(np.concatenate(keys)), np.concatenate(owners), LMState.concat(states),
                             np.concatenate(contexts))

    # ----------------------------------------------------------------------------------- scoring
    def score(self, texts: Sequence[str] | str, retriever=None) -> list[ScoreResult]:
        """Per-token log-probs and perplexity of each text: parametric, and under `retriever` (a retriever
        object, a mode name, or None for parametric only) from the same pass."""
        if isinstance(texts, str):
            texts = [texts]
        retriever = self._resolve(retriever)
        if retriever is not None:
            return retriever.score(self, texts)
        pos = self.collect(texts)
        return [ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel], logp=pos.logp_lm[sel],
                            mode="parametric")
                for sel in (pos.text_index == ti for ti in range(len(texts)))]

    # ----------------------------------------------------------------------------------- generation
    def generate(self, prompt: str, sampling: SamplingParams | None = None, retriever=None,
                 should_stop: Callable[[], bool] | None = None, prompt_ids: list[int] | None = None,
                 policy: OutputPolicy | None = None) -> Generation:
        """Stream a completion token by token (KV cache reused), the retriever's mixture applied at every
        step. `should_stop` is polled before each step (cancellation, deadlines). `policy` (output controls)
        caps verbatim spans and keeps disallowed documents out, through a VerbatimGuard. Iterate the
        returned `Generation`; its `completion` (text, tokens, finish_reason, ...) is set at the end."""
        sampling = sampling or SamplingParams()
        retriever = self._resolve(retriever)
        ids = prompt_ids if prompt_ids is not None else [self.tokenizer.eos_token_id] + self.encode(prompt)
        self.check_prompt(ids)
        guard = self.guard(retriever, policy)
        if retriever is not None:
            ids = retriever.prepare(self, prompt, ids, sampling, allowed=guard.allowed if guard else None)
        return Generation(self._steps(ids, sampling, retriever, should_stop, guard))

    def _steps(self, ids: list[int], sampling: SamplingParams, retriever, should_stop, guard=None):
        """One sequence through the batch decoder (the serving engine runs many through it at once)."""
        decoder = BatchDecoder(self)
        seq = decoder.add(Decoding(ids, sampling, retriever, guard, should_stop))
        yield from seq.take()
        while not seq.done:
            decoder.step()
            yield from seq.take()
        return seq.completion

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def complete(self, prompt: str, sampling: SamplingParams | None = None, retriever=None, attribute: bool = True,
                 should_stop: Callable[[], bool] | None = None, prompt_ids: list[int] | None = None,
                 policy: OutputPolicy | None = None) -> Completion:
        """Generate to the end and attribute each sentence to its sources, with verbatim spans and the
        licence notices `policy` requires (unless `attribute` is False)."""
        retriever = self._resolve(retriever)
        generation = self.generate(prompt, sampling, retriever, should_stop, prompt_ids, policy)
        for _ in generation:
            pass
        comp = generation.completion
        if attribute:
            comp.attributions = self.attribute(comp, retriever, policy)
            comp.notices = license_notices(comp.attributions, policy or NO_POLICY)
        return comp

    def attribute(self, comp: Completion, retriever=None, policy: OutputPolicy | None = None) -> list:
        """Per-sentence sources (and verbatim spans) of a completion made with `retriever` (None:
        parametric, share 1)."""
        if retriever is None:
            return attribute_steps(comp.text, comp.steps, None)
        return retriever.attribute(comp.text, comp.steps, span_min_chars=(policy or NO_POLICY).span_min_chars)
