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

Every generation takes one path: `start(GenerationRequest) -> Decoding` (prompt ids, retriever, output
policy, guard, the retriever's `prepare`), a `BatchDecoder` that advances it (alone in `generate` and
`complete`, with many others in the serving engine), and `finish(decoding) -> Completion` (attribution and
licence notices).
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from silo.core.fingerprint import model_fingerprint
from silo.core.models import load_lm
from silo.datastore.blocks import BlockStore, has_blocks
from silo.datastore.keys import OutputInputCapture, decoder_matches_head_input, window_plan
from silo.datastore.store import Datastore, DatastoreError

from silo.core.models import chat_template_of

from .attribution import attribute_steps
from .batch import BatchDecoder, Decoding
from .gate import Gate
from .detok import decode_with_offsets
from .guard import TokenTexts, VerbatimGuard
from .knn import FixedMixture, KNNConfig, KNNRetriever
from .output_policy import NO_POLICY, OutputPolicy, license_notices
from .trace import attach_training_spans, trace_spans
from .protocols import Retriever, SequenceRetrieval
from .request import AUTO, MODES, ChatMessage, GenerationRequest, RetrievalParams
from .ric import RICConfig, RICRetriever
from .sampling import SamplingParams
from .types import (CONTEXT, Completion, GenerationStep, LMState, PositionBatch, ScoreResult, SiloInputError, TokenLogprob,
                    TopTokens, context_of)

log = logging.getLogger("silo.model")
_DEFAULT = object()  # `start`: no retriever object given, build one from the request's retrieval settings
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

    Its prompt runs when the iteration starts; iterating again after the end yields nothing more."""

    def __init__(self, lm: "SiloLM", decoding: Decoding):
        self.decoding = decoding
        self._lm = lm
        self._decoder: BatchDecoder | None = None

    @property
    def completion(self) -> Completion | None:
        return self.decoding.completion

    def __iter__(self) -> Iterator[GenerationStep]:
        seq = self.decoding
        if self._decoder is None and not seq.done:
            self._decoder = BatchDecoder(self._lm)
            self._decoder.add(seq)
        yield from seq.take()
        while not seq.done:
            self._decoder.step()
            yield from seq.take()


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
        # the caches below are filled by whichever thread asks first (the engine's worker, a server's RPC
        # thread reading the kNN defaults): one lock, so two threads never build one twice
        self._cache_lock = threading.RLock()
        self._retrievers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._store: Datastore | None = None
        self._blocks: tuple | None = None  # (store snapshot, dense model, BlockStore) for mode ric
        self._gate: tuple | None = None  # (store snapshot, Gate or None)
        self._has_blocks: tuple | None = None  # (store snapshot, bool)
        self._ngrams: tuple | None = None  # (store snapshot, StoreNgrams | str: why it has none, inf-gram gates)
        self._token_texts: TokenTexts | None = None
        self.training_index = None  # silo.training.index.TrainingIndex: tracing and the guard over training text
        if store is not None:
            self.swap_store(store)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_path: str, store_path: str | None = None, knn: KNNConfig | None = None,
             device: str = "cpu", dtype: str | None = "auto", **kwargs) -> "SiloLM":
        """`device`: auto | cpu | cuda | cuda:N for the model (the store's index stays where it is opened:
        CPU FAISS unless the store is opened on cuda); `dtype`: auto (bfloat16/float16 on a GPU) or a torch
        dtype name."""
        from silo.training.index import TrainingIndex, TrainingIndexError, has_training_index

        model, tokenizer = load_lm(model_path, device, dtype)
        lm = cls(model, tokenizer, knn=knn, **kwargs)
        if has_training_index(model_path):  # written by `silo train` / `silo index`
            try:
                lm.training_index = TrainingIndex.open(model_path, lm.fingerprint)
            except TrainingIndexError as exc:  # made for other weights (a modified copy): not used, said
                _warn_once(f"{exc}; outputs are not traced to the training data")
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
        with self._cache_lock:
            old, self._store = self._store, store
            self._blocks = None  # the RIC block, gate and retriever caches belonged to the old snapshot
            self._gate = None
            self._has_blocks = None
            self._ngrams = None
            self._retrievers = weakref.WeakValueDictionary()
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
        with self._cache_lock:
            store = self._store
            if store is None:
                raise SiloInputError("mode 'ric' needs a datastore with blocks; attach a store (store path) first",
                                     "mode")
            cached = self._blocks
            if cached is not None and cached[0] is store and cached[1] == dense_model:
                return cached[2]
            bs = BlockStore(store, dense_model)
            self._blocks = (store, dense_model, bs)
            return bs

    # ----------------------------------------------------------------------------------- retrievers
    def gate(self) -> Gate | None:
        """The gate fitted for the attached snapshot's store (gate.json), cached until the snapshot changes."""
        with self._cache_lock:
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
            raise SiloInputError.of("mode", f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode == "parametric":
            return None
        if store is not None and store is not self._store:
            if store.fingerprint != self.fingerprint:
                raise DatastoreError(f"{store.path}: the store was built for another model")
            gate = Gate.load(store)
        else:
            store, gate = self._store, self.gate()
        if store is None:
            raise SiloInputError.of("mode", self._mode_problem(mode))
        if mode != "knn":  # RIC-LM, the inf-gram (alone or over kNN-LM)
            return self._other_retriever(mode, store, ric, dict(k=k, lmbda=lmbda, tau=tau, mixture=mixture, skip=skip))
        s = self.knn
        if mixture not in (None, "gated", "fixed"):
            raise SiloInputError.of("mixture", f"must be gated or fixed (got {mixture!r})")
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
        """A VerbatimGuard for ONE sequence generated with `retriever` under `policy` (and over the training
        data, when the model has its training-data index); None when there is nothing to guard (no cap and
        no disallowed document in the policy, or parametric mode without a training-data index)."""
        if policy is None or not policy.guarded or (retriever is None and self.training_index is None):
            return None
        return VerbatimGuard(retriever.store if retriever is not None else None, policy, self.token_texts(),
                             self.training_index)

    def _resolve(self, retriever):
        return self.retriever(retriever) if isinstance(retriever, str) or retriever is None else retriever

    def has_blocks(self) -> bool:
        """Does the attached snapshot carry RIC-LM blocks (asked once per snapshot)?"""
        with self._cache_lock:
            store = self._store
            if store is None:
                return False
            if self._has_blocks is None or self._has_blocks[0] is not store:
                self._has_blocks = (store, any(has_blocks(sh.dir) for sh in store.shards))
            return self._has_blocks[1]

    def ngrams(self, store: Datastore | None = None):
        """(StoreNgrams or None, why not, the inf-gram gates) of the attached snapshot (or `store`), cached
        per snapshot."""
        from silo.datastore.infgram import StoreNgrams

        from .infgram import load_gates

        with self._cache_lock:
            store = store or self._store
            cached = self._ngrams
            if cached is not None and cached[0] is store:
                return cached[1:]
            try:
                got = (StoreNgrams(store), None, load_gates(store))
            except DatastoreError as exc:
                got = (None, str(exc), {})
            if store is self._store:
                self._ngrams = (store, *got)
            return got

    def _other_retriever(self, mode: str, store: Datastore, ric, knn: dict):
        if mode == "ric":
            cfg = ric if isinstance(ric, RICConfig) else None
            return RICRetriever(self.blocks(cfg.dense_model if cfg else (ric or {}).get("dense_model")), ric)
        return self.infgram_retriever(store, mode, knn)

    def infgram_retriever(self, store: Datastore, mode: str = "infgram", knn: dict | None = None):
        """The inf-gram retriever over `store`, mixed into the LM (mode infgram) or into the kNN-LM retriever
        that `knn`'s settings give (mode knn+infgram), through the store's inf-gram gate for that base."""
        from .infgram import InfgramRetriever

        base = self.retriever("knn", store=store, **(knn or {})) if mode == "knn+infgram" else None

        ngrams, problem, gates = self.ngrams(store)
        if ngrams is None:
            raise SiloInputError.of("mode", problem)
        which = "knn" if base is not None else "lm"
        gate = gates.get(which)
        if gate is None:
            raise SiloInputError.of("mode", f"{store.path}: no inf-gram gate fitted over the "
                                            f"{'kNN-LM' if base is not None else 'LM'}; fit one with "
                                            "`silo datastore fit-infgram`")
        return InfgramRetriever(store, ngrams, gate, self.vocab_size, base)

    def modes(self) -> list[str]:
        """The modes this model can serve with its attached snapshot."""
        return [m for m in MODES if self._mode_problem(m) is None]

    def _mode_problem(self, mode: str) -> str | None:
        if mode != "parametric" and self._store is None:
            return f"mode '{mode}' needs a datastore and none is attached; use 'parametric'"
        if mode == "ric" and not self.has_blocks():
            return ("mode 'ric' needs a datastore with RIC-LM blocks and the attached store has none (silo "
                    "datastore build-blocks); use 'knn' or 'parametric'")
        if mode in ("infgram", "knn+infgram"):
            ngrams, problem, gates = self.ngrams()
            if ngrams is None:
                return f"mode '{mode}' needs inf-gram indexes: {problem}"
            if ("knn" if mode == "knn+infgram" else "lm") not in gates:
                return f"mode '{mode}' needs an inf-gram gate (silo datastore fit-infgram); use 'knn' or 'parametric'"
        return None

    def resolve_mode(self, mode: str) -> str:
        """The mode a request's `mode` means here (auto: knn with a store, else parametric); refuses a mode
        the attached snapshot cannot serve, naming the field `mode`."""
        if mode == AUTO:
            return "knn" if self._store is not None else "parametric"
        if mode not in MODES:
            raise SiloInputError.of("mode", f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        problem = self._mode_problem(mode)
        if problem is not None:
            raise SiloInputError.of("mode", problem)
        return mode

    def retriever_for(self, params: RetrievalParams) -> Retriever | None:
        """The retriever for a request's retrieval settings over the attached snapshot, shared by every
        request with the same settings while one of them holds it (kNN sequences of one retriever share one
        search per step; per-sequence state lives in each sequence, so sharing is safe for every mode)."""
        mode = self.resolve_mode(params.mode)
        if mode == "parametric":
            return None
        key = (mode, params.k, params.lmbda, params.tau, params.mixture, params.skip, params.ric_retriever,
               params.ric_blocks)
        with self._cache_lock:
            store = self._store
            shared = self._retrievers.get(key)
            if shared is None or shared.store is not store:
                shared = self.retriever(mode, k=params.k, lmbda=params.lmbda, tau=params.tau, ric=params.ric,
                                        mixture=params.mixture, skip=params.skip)
                self._retrievers[key] = shared
            return shared

    def served_knn(self) -> dict:
        """What a kNN request without overrides gets: the store's gate (`mixture` gated, its k and skip
        threshold) or the LM's fixed settings. Reads the cached gate; builds no retriever."""
        s = self.knn
        out = {"mixture": "fixed", "k": s.k, "lmbda": s.lmbda, "tau": s.tau, "skip_threshold": 0.0}
        gate = self.gate() if s.mixture == "gated" else None
        if gate is not None:
            out.update(mixture="gated", k=gate.k, skip_threshold=_skip_threshold(s.skip, gate))
        return out

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
            raise SiloInputError.of(field, f"{len(ids)} tokens (with BOS); the model's context is "
                                           f"{self.context_length} tokens and at least one must be left to generate")

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """The chat rendered by the tokenizer's chat template (SILO's default where it ships none), ready for
        the assistant's turn; a template that refuses the messages (some orders of roles) names `messages`."""
        try:
            return self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                                      tokenize=False, add_generation_prompt=True,
                                                      chat_template=chat_template_of(self.tokenizer))
        except Exception as exc:  # noqa: BLE001 - Jinja's raise_exception and friends
            raise SiloInputError.of("messages", f"the chat template refused them: {exc}") from None

    def request_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids (BOS first; a prompt given as ids is taken as it is) of a request, checked
        against the context (a request that only scores its prompt reads it in windows: any length)."""
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            if not all(0 <= t < self.vocab_size for t in ids):
                raise SiloInputError.of(request.prompt_field, f"token ids must be in [0, {self.vocab_size})")
        else:
            text = request.prompt if request.messages is None else self.chat_prompt(request.messages)
            ids = [self.tokenizer.eos_token_id] + self.encode(text)
        if not request.scores_only:
            self.check_prompt(ids, request.prompt_field)
        return ids

    def collect(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> PositionBatch:
        """Run the LM over texts in sliding windows; every token is scored once (first token after BOS).

        Window `self.window`, stride `self.stride`: the first window scores all its tokens, later windows
        only the last `stride` ones (SILO's protocol; 1,024/512 there, the model's context and half of it
        by default here).
        """
        return self.collect_ids([self.text_ids(t) for t in texts], progress)

    def text_ids(self, text: str) -> list[int]:
        """A text as the scoring path reads it: BOS, then its tokens."""
        return [self.tokenizer.eos_token_id] + self.encode(text)

    def collect_ids(self, id_lists: Sequence[Sequence[int]], progress: Callable[[int], None] | None = None,
                    top: int = 0, rows: bool = False) -> PositionBatch:
        """`collect` for token-id sequences: each sequence's first id is its start (BOS for a text) and every
        later id is scored. `top` > 0 keeps the LM's `top` most probable tokens at each position
        (`PositionBatch.top`), `rows` its whole next-token log-distribution (`logp_rows`, float32: what
        kNN-LM's alternatives are mixed from)."""
        jobs = [(ti, b, e, first_new) for ti, ids in enumerate(id_lists) if len(ids) > 1
                for b, e, first_new in window_plan(len(ids) - 1, self.window, self.stride)]
        parts: dict[str, list] = {name: [] for name in ("targets", "logp", "keys", "owners", "states", "contexts",
                                                        "top_ids", "top_logp", "rows")}
        for i in range(0, len(jobs), self.batch_size):
            chunk = jobs[i:i + self.batch_size]
            self._collect_chunk(id_lists, chunk, parts, top, rows)
            if progress:
                progress(sum(e - f for _, _, e, f in chunk))
        if not parts["targets"]:
            d = self.model.get_output_embeddings().in_features
            return PositionBatch(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, d), np.float32), np.zeros(0, np.int32),
                                 LMState.empty(), np.zeros((0, CONTEXT), np.int64),
                                 TopTokens(np.zeros((0, top), np.int64), np.zeros((0, top))) if top else None,
                                 np.zeros((0, self.vocab_size), np.float32) if rows else None)
        return PositionBatch(np.concatenate(parts["targets"]), np.concatenate(parts["logp"]),
                             np.ascontiguousarray(np.concatenate(parts["keys"])), np.concatenate(parts["owners"]),
                             LMState.concat(parts["states"]), np.concatenate(parts["contexts"]),
                             TopTokens(np.concatenate(parts["top_ids"]), np.concatenate(parts["top_logp"])) if top else None,
                             np.concatenate(parts["rows"]) if rows else None)

    def _collect_chunk(self, id_lists, chunk, parts: dict, top: int, rows: bool) -> None:
        """One batched forward of `chunk`'s windows (right-padded), its scored positions added to `parts`."""
        T = max(e - b for _, b, e, _ in chunk)
        ids = torch.full((len(chunk), T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (ti, b, e, _) in enumerate(chunk):
            ids[r, : e - b] = torch.tensor(list(id_lists[ti][b:e]))
            mask[r, : e - b] = 1
        hidden, logits, _ = self.forward(ids.to(self.device), mask.to(self.device))
        logprobs = torch.log_softmax(logits, dim=-1)
        for r, (ti, b, e, first_new) in enumerate(chunk):
            sel = slice(first_new - b, e - b)
            seq = id_lists[ti]
            tgt = torch.tensor(list(seq[first_new + 1: e + 1]), dtype=torch.long)
            parts["logp"].append(logprobs[r, sel].gather(1, tgt.to(logprobs.device)[:, None])[:, 0].double().cpu().numpy())
            parts["states"].append(LMState.of(logprobs[r, sel]))
            parts["contexts"].append(np.stack([context_of(seq, i) for i in range(first_new, e)]))
            parts["targets"].append(tgt.numpy())
            parts["keys"].append(hidden[r, sel].cpu().numpy())
            parts["owners"].append(np.full(len(tgt), ti, dtype=np.int32))
            if top:
                best = torch.topk(logprobs[r, sel], min(top, logprobs.shape[-1]), dim=-1)
                parts["top_ids"].append(best.indices.cpu().numpy().astype(np.int64))
                parts["top_logp"].append(best.values.double().cpu().numpy())
            if rows:
                parts["rows"].append(logprobs[r, sel].cpu().numpy())

    # ----------------------------------------------------------------------------------- scoring
    def score(self, texts: Sequence[str] | str, retriever=None, top: int = 0) -> list[ScoreResult]:
        """Per-token log-probs and perplexity of each text: parametric, and under `retriever` (a retriever
        object, a mode name, or None for parametric only) from the same pass. `top` > 0 also gives the
        `top` most probable tokens at each position under the same distribution (`ScoreResult.top`)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.score_ids([self.text_ids(t) for t in texts], retriever, top)

    def score_ids(self, id_lists: Sequence[Sequence[int]], retriever=None, top: int = 0) -> list[ScoreResult]:
        """`score` for token-id sequences, each read from its first id (BOS for a text; a prompt given as ids
        is taken as it is): every later id gets its log-prob, as `score` gives a text's."""
        retriever = self._resolve(retriever)
        if retriever is not None:
            return retriever.score_ids(self, id_lists, top)
        pos = self.collect_ids(id_lists, top=top)
        return [ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel], logp=pos.logp_lm[sel],
                            mode="parametric", top=pos.top.rows(sel) if top else None)
                for sel in (pos.text_index == ti for ti in range(len(id_lists)))]

    def token_texts(self) -> TokenTexts:
        """Every token's text decoded on its own (built once, on first use)."""
        with self._cache_lock:
            if self._token_texts is None:
                self._token_texts = TokenTexts.of(self.tokenizer, self.vocab_size)
            return self._token_texts

    def prompt_logprobs(self, ids: Sequence[int], retriever, top: int = 0, first_scored: bool = False
                        ) -> tuple[str, list[TokenLogprob]]:
        """A prompt's text and its tokens with their log-probs, scored as `score_ids` scores them (what echo
        returns). `first_scored`: ids[0] is BOS, scored from but not returned (a text prompt); else ids[0] is
        the prompt's first token and has no log-prob (a prompt given as ids)."""
        res = self.score_ids([ids], retriever, top)[0]
        shown = list(ids[1:]) if first_scored else list(ids)
        text, offsets = decode_with_offsets(self.tokenizer, shown)
        texts = self.token_texts().texts
        lam = res.lmbda if res.lmbda is not None else np.zeros(len(res.logp))
        out = [] if first_scored else [TokenLogprob(int(ids[0]), texts[int(ids[0])], None, None, 0.0, 0)]
        for j, tok in enumerate(res.tokens):
            alts = ([(int(t), texts[int(t)], float(v)) for t, v in zip(res.top.ids[j], res.top.logp[j])]
                    if res.top is not None else [])
            out.append(TokenLogprob(int(tok), texts[int(tok)], float(res.logp[j]), float(res.logp_parametric[j]),
                                    float(lam[j]), offsets[len(out)], alts))
        return text, out

    # ----------------------------------------------------------------------------------- generation
    def start(self, request: GenerationRequest, retriever=_DEFAULT, policy: OutputPolicy | None = None,
              should_stop: Callable[[], bool] | None = None, attribute: bool | None = None) -> Decoding:
        """Set up one generation (its prompt runs when a `BatchDecoder` adds it): the prompt's ids, the
        retriever (the request's retrieval settings, or `retriever`: an object, a mode name or None for
        parametric), the output policy (`policy`, the operator's, tightened by the request's controls), the
        verbatim guard, and the retriever's `prepare`. `should_stop` is polled before each step
        (cancellation, deadlines). `attribute` (default: for retrieval modes, or when the request asks for
        attributions) says whether `finish` attributes the completion."""
        retriever = self.retriever_for(request.retrieval) if retriever is _DEFAULT else self._resolve(retriever)
        ids = self.request_ids(request)
        echo = self.prompt_logprobs(ids, retriever, request.output.top_logprobs, request.prompt_ids is None
                                    ) if request.output.echo else None
        if request.scores_only:  # nothing to generate: done as it starts
            return self._scored(request, ids, retriever, echo)
        policy = request.output.policy(policy or NO_POLICY)
        guard = self.guard(retriever, policy)
        state = SequenceRetrieval()
        if retriever is not None:
            ids, state = retriever.prepare(self, ids, request.sampling, allowed=guard.allowed if guard else None)
        if attribute is None:  # (with a training-data index every output is traced: its notices go out always)
            attribute = retriever is not None or request.output.attributions or self.training_index is not None
        seq = Decoding(ids, request.sampling, retriever, guard, should_stop, retrieval=state, policy=policy,
                       attribute=attribute, logprobs=request.output.logprobs)
        seq.echo = echo
        return seq

    def _scored(self, request: GenerationRequest, ids: list[int], retriever, echo) -> Decoding:
        """The Decoding of a request that generates nothing: finished, with its prompt's log-probs."""
        seq = Decoding(ids, request.sampling, retriever, attribute=False, logprobs=request.output.logprobs)
        seq.echo = echo
        seq.completion = Completion(text="", tokens=[], finish_reason="length", prompt_tokens=len(ids), steps=[],
                                    mode=retriever.mode if retriever is not None else "parametric",
                                    store_generation=retriever.store_generation if retriever is not None else None,
                                    logprobs=[] if request.output.logprobs is not None else None)
        return seq

    def finish(self, decoding: Decoding) -> Completion:
        """A finished generation's completion, with each sentence attributed to its sources (verbatim spans
        included) and the licence notices its policy requires, when the decoding was started to attribute."""
        comp = decoding.completion
        if comp is None:
            raise RuntimeError("finish: the generation has not finished yet")
        if decoding.echo is not None:
            comp.prompt_text, comp.prompt_logprobs = decoding.echo
        if decoding.attribute:
            comp.attributions = self.attribute(comp, decoding.retriever, decoding.policy, decoding.retrieval)
            self.trace(comp, decoding.policy)
            comp.notices = license_notices(comp.attributions, decoding.policy)
        return comp

    def run(self, request: GenerationRequest, retriever=_DEFAULT, policy: OutputPolicy | None = None,
            should_stop: Callable[[], bool] | None = None, attribute: bool | None = None) -> Completion:
        """A request generated to the end on its own and finished (`start`, then `finish`)."""
        generation = Generation(self, self.start(request, retriever, policy, should_stop, attribute))
        for _ in generation:
            pass
        return self.finish(generation.decoding)

    def generate(self, prompt: str, sampling: SamplingParams | None = None, retriever=None,
                 should_stop: Callable[[], bool] | None = None, prompt_ids: list[int] | None = None,
                 policy: OutputPolicy | None = None) -> Generation:
        """Stream a completion token by token (KV cache reused), the retriever's mixture applied at every
        step. `should_stop` is polled before each step (cancellation, deadlines). `policy` (output controls)
        caps verbatim spans and keeps disallowed documents out, through a VerbatimGuard. Iterate the
        returned `Generation`; its `completion` (text, tokens, finish_reason, ...) is set at the end."""
        request = GenerationRequest(prompt=None if prompt_ids is not None else prompt, prompt_ids=prompt_ids,
                                    sampling=sampling or SamplingParams())
        return Generation(self, self.start(request, retriever, policy, should_stop))

    def complete(self, prompt: str, sampling: SamplingParams | None = None, retriever=None, attribute: bool = True,
                 should_stop: Callable[[], bool] | None = None, prompt_ids: list[int] | None = None,
                 policy: OutputPolicy | None = None) -> Completion:
        """Generate to the end and attribute each sentence to its sources, with verbatim spans and the
        licence notices `policy` requires (unless `attribute` is False)."""
        request = GenerationRequest(prompt=None if prompt_ids is not None else prompt, prompt_ids=prompt_ids,
                                    sampling=sampling or SamplingParams())
        return self.run(request, retriever, policy, should_stop, attribute)

    def attribute(self, comp: Completion, retriever=None, policy: OutputPolicy | None = None,
                  retrieval: SequenceRetrieval | None = None) -> list:
        """Per-sentence sources (and verbatim spans) of a completion made with `retriever` (None:
        parametric, share 1); `retrieval`: the sequence's own retriever state (RIC-LM's prepended blocks)."""
        if retriever is None:
            return attribute_steps(comp.text, comp.steps, None)
        return retriever.attribute(comp.text, comp.steps, retrieval or SequenceRetrieval(),
                                   span_min_chars=(policy or NO_POLICY).span_min_chars)

    def trace(self, comp: Completion, policy: OutputPolicy | None = None) -> None:
        """Give each sentence of an attributed completion its spans found in the training data
        (silo/model/trace.py); nothing without a training-data index."""
        if self.training_index is None or not comp.attributions:
            return
        n = (policy or NO_POLICY).trace_min_chars
        attach_training_spans(comp.attributions, trace_spans(self.training_index, comp.text, comp.steps, n), n)

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()
