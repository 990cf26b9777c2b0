"""SiloLM: a parametric LM plus an optional kNN datastore, for scoring, generation and attribution.

Works with any Hugging Face causal LM. Keys are the input of the output layer (see
`silo.datastore.keys`): when the decoder returns exactly that tensor we run decoder and head ourselves
(thread-safe, no hooks); otherwise a forward pre-hook captures it under a lock.

The datastore is an immutable snapshot held by reference: `swap_store` replaces the reference in one
assignment, so a generation in flight keeps the snapshot it started with and the next request sees the
new one (how removals reach a running server without a restart).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch

from silo.datastore.keys import OutputInputCapture, decoder_matches_head_input, window_plan
from silo.datastore.sentences import sentence_of_offsets, sentence_spans
from silo.datastore.store import Datastore, DatastoreError, load_lm
from silo.training.fingerprint import model_fingerprint

from .knn import KNNConfig, interpolate, knn_distribution, knn_target_logprob

Mode = Literal["parametric", "knn", "ric"]
MODES = ("parametric", "knn", "ric")  # ric: retrieval in context, silo/ric.py


class SiloInputError(ValueError):
    """A request to SiloLM is invalid; the message names the argument."""


@dataclass
class PositionBatch:
    """Per scored position of a set of texts: the target token, its LM log-prob and the key."""

    targets: np.ndarray  # [N] int64
    logp_lm: np.ndarray  # [N] float64
    keys: np.ndarray  # [N, d] float32
    text_index: np.ndarray  # [N] int32: which input text each position belongs to


@dataclass
class ScoreResult:
    tokens: list[int]
    logp_parametric: np.ndarray
    logp: np.ndarray  # log-probs under the requested mode
    mode: str

    @property
    def num_tokens(self) -> int:
        return len(self.logp)

    @property
    def perplexity(self) -> float:
        return float(math.exp(-self.logp.mean())) if len(self.logp) else float("nan")

    @property
    def perplexity_parametric(self) -> float:
        return float(math.exp(-self.logp_parametric.mean())) if len(self.logp_parametric) else float("nan")


@dataclass
class StepSupport:
    """Why one token was emitted: its probability and the datastore entries that carried it."""

    token: int
    p: float  # final probability of the token (before sampling temperature)
    p_parametric: float
    p_knn: float
    lmbda: float
    neighbors: list[tuple[int, int, float]] = field(default_factory=list)  # (shard, entry id, weight) with value == token


@dataclass
class GenerationStep:
    token: int
    text: str  # the text this step releases (may be empty while a multi-byte character or stop is pending)
    support: StepSupport
    offset: int = 0  # character offset in the completion where this token's text starts (for attribution)


@dataclass
class Source:
    owner: str
    document_id: str
    title: str
    license: str
    shard: str
    sentence: str
    share: float


@dataclass
class SentenceAttribution:
    sentence: str
    start: int
    end: int
    parametric_share: float
    sources: list[Source]


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    steps: list[GenerationStep]
    attributions: list[SentenceAttribution] = field(default_factory=list)
    store_generation: int | None = None


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
            raise SiloInputError(f"stride ({self.stride}) must not exceed window ({self.window})")
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.vocab_size = model.get_output_embeddings().out_features
        self.fingerprint = model_fingerprint(model, tokenizer)
        self._fast = decoder_matches_head_input(model)
        self._hook_lock = threading.Lock()
        self._store: Datastore | None = None
        if store is not None:
            self.swap_store(store)

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, model_path: str, store_path: str | None = None, knn: KNNConfig | None = None,
             device: str = "cpu", **kwargs) -> "SiloLM":
        model, tokenizer = load_lm(model_path, device)
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
        old, self._store = self._store, store
        return old

    def reload_store(self) -> bool:
        """Pick up a newer generation of the attached store from disk; True if it changed."""
        cur = self._store
        if cur is None:
            return False
        from silo.datastore.removal import open_store_retrying  # retries past a concurrent folder deletion

        new = open_store_retrying(cur.path, fingerprint=self.fingerprint, device=cur.device, reuse=cur)
        if new.generation == cur.generation:
            return False
        self._store = new
        return True

    # ----------------------------------------------------------------------------------- forward
    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, past=None):
        """(hidden [B,T,d] float32, logits [B,T,V] float32, past) for a batch."""
        if self._fast:
            out = self.model.get_decoder()(input_ids=ids, attention_mask=mask, past_key_values=past,
                                           use_cache=past is not None)
            hidden = out.last_hidden_state
            logits = self.model.get_output_embeddings()(hidden)
            return hidden.float(), logits.float(), getattr(out, "past_key_values", None)
        with self._hook_lock, OutputInputCapture(self.model) as cap:
            out = self.model(input_ids=ids, attention_mask=mask, past_key_values=past, use_cache=past is not None)
            hidden = cap.value
        return hidden.float(), out.logits.float(), getattr(out, "past_key_values", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def collect(self, texts: Sequence[str], progress: Callable[[int], None] | None = None) -> PositionBatch:
        """Run the LM over texts in sliding windows; every token is scored once (first token after BOS).

        Window `self.window`, stride `self.stride`: the first window scores all its tokens, later windows
        only the last `stride` ones (SILO's protocol; 1,024/512 there, the model's context and half of it
        by default here).
        """
        bos = self.tokenizer.eos_token_id
        jobs = []  # (text index, ids, begin, end, first_new)
        per_text_ids = []
        for ti, text in enumerate(texts):
            ids = [bos] + self.encode(text)
            per_text_ids.append(ids)
            for b, e, first_new in window_plan(len(ids) - 1, self.window, self.stride) if len(ids) > 1 else []:
                jobs.append((ti, b, e, first_new))
        targets, logps, keys, owners = [], [], [], []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(jobs), self.batch_size):
            chunk = jobs[i:i + self.batch_size]
            T = max(e - b for _, b, e, _ in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), T), dtype=torch.long)
            for r, (ti, b, e, _) in enumerate(chunk):
                ids[r, : e - b] = torch.tensor(per_text_ids[ti][b:e])
                mask[r, : e - b] = 1
            hidden, logits, _ = self._forward(ids.to(self.device), mask.to(self.device))
            logprobs = torch.log_softmax(logits, dim=-1)
            for r, (ti, b, e, first_new) in enumerate(chunk):
                rows = slice(first_new - b, e - b)
                tgt = torch.tensor(per_text_ids[ti][first_new + 1: e + 1], dtype=torch.long)
                lp = logprobs[r, rows].gather(1, tgt.to(logprobs.device)[:, None])[:, 0]
                targets.append(tgt.numpy())
                logps.append(lp.double().cpu().numpy())
                keys.append(hidden[r, rows].cpu().numpy())
                owners.append(np.full(len(tgt), ti, dtype=np.int32))
            if progress:
                progress(sum(e - f for _, _, e, f in chunk))
        if not targets:
            d = self.model.get_output_embeddings().in_features
            return PositionBatch(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, d), np.float32), np.zeros(0, np.int32))
        return PositionBatch(np.concatenate(targets), np.concatenate(logps),
                             np.ascontiguousarray(np.concatenate(keys)), np.concatenate(owners))

    # ----------------------------------------------------------------------------------- scoring
    def _settings(self, k, lmbda, temperature) -> KNNConfig:
        try:
            return KNNConfig(k=k if k is not None else self.knn.k,
                             lmbda=lmbda if lmbda is not None else self.knn.lmbda,
                             temperature=temperature if temperature is not None else self.knn.temperature)
        except Exception as exc:
            raise SiloInputError(f"invalid kNN setting: {exc}") from None

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise SiloInputError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        if mode in ("knn", "ric") and self._store is None:
            raise SiloInputError(f"mode '{mode}' needs a datastore; attach one (store path) or use mode 'parametric'")

    def score(self, texts: Sequence[str] | str, mode: Mode = "knn", k: int | None = None,
              lmbda: float | None = None, temperature: float | None = None, ric=None) -> list[ScoreResult]:
        """Per-token log-probs and perplexity of each text; parametric and the requested mode from one pass."""
        if isinstance(texts, str):
            texts = [texts]
        self._check_mode(mode)
        if mode == "ric":  # retrieval in context (RICConfig or dict in `ric`): silo/ric.py
            from .ric import ric_score
            return ric_score(self, texts, ric)
        s = self._settings(k, lmbda, temperature)
        pos = self.collect(texts)
        logp = pos.logp_lm
        if mode == "knn" and len(pos.targets):
            nb = self._store.search(pos.keys, s.k)
            logp = interpolate(pos.logp_lm, knn_target_logprob(nb.distances, nb.tokens, pos.targets, s.temperature), s.lmbda)
        out = []
        for ti in range(len(texts)):
            sel = pos.text_index == ti
            out.append(ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel],
                                   logp=logp[sel], mode=mode))
        return out

    # ----------------------------------------------------------------------------------- generation
    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, stop: Sequence[str] = (), seed: int | None = None, mode: Mode = "knn",
                 k: int | None = None, lmbda: float | None = None, knn_temperature: float | None = None,
                 should_stop: Callable[[], bool] | None = None, result: dict | None = None,
                 prompt_ids: list[int] | None = None, ric=None) -> Iterator[GenerationStep]:
        """Yield tokens one at a time, kNN-LM applied at every step (KV cache reused).

        temperature 0 means greedy. `should_stop` is polled before each step (cancellation, deadlines).
        On return, `result` (if given) holds finish_reason, text, tokens, prompt_tokens and the store
        generation used.
        """
        self._check_mode(mode)
        if mode == "ric":  # prepend retrieved blocks, then generate parametrically: silo/ric.py
            from .ric import ric_generate
            yield from ric_generate(self, prompt, ric, max_new_tokens=max_new_tokens, result=result,
                                    temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed,
                                    should_stop=should_stop)
            return
        s = self._settings(k, lmbda, knn_temperature)
        if max_new_tokens < 1:
            raise SiloInputError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if temperature < 0:
            raise SiloInputError(f"temperature must be >= 0 (got {temperature})")
        if not 0 < top_p <= 1:
            raise SiloInputError(f"top_p must be in (0, 1] (got {top_p})")
        if top_k < 0:
            raise SiloInputError(f"top_k must be >= 0 (got {top_k})")
        stop = [x for x in stop if x]
        ids = prompt_ids if prompt_ids is not None else [self.tokenizer.eos_token_id] + self.encode(prompt)
        if len(ids) >= self.context_length:
            raise SiloInputError(f"prompt is {len(ids)} tokens; the model's context is {self.context_length} tokens")
        store = self._store if mode == "knn" else None  # one snapshot for the whole generation
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, (1,))))
        result = result if result is not None else {}
        result.update(prompt_tokens=len(ids), store_generation=store.generation if store else None)

        hidden, logits, past = self._forward(torch.tensor([ids], device=self.device), past=self._new_cache())
        out_ids: list[int] = []
        released = 0  # characters of the completion already yielded
        text = ""
        finish = "length"
        max_stop = max((len(x) for x in stop), default=0)
        for _ in range(max_new_tokens):
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
            logp_lm = torch.log_softmax(logits[0, -1].double(), dim=-1)
            support_nb = None
            if store is not None:
                nb = store.search(hidden[0, -1:].cpu().numpy(), s.k)
                p_knn, w = knn_distribution(nb.distances[0], nb.tokens[0], s.temperature, self.vocab_size)
                p = s.lmbda * p_knn + (1 - s.lmbda) * logp_lm.exp()
                support_nb = (nb, w, p_knn)
            else:
                p = logp_lm.exp()
            token = _sample(p, temperature, top_p, top_k, gen)
            sup = StepSupport(token=token, p=float(p[token]), p_parametric=float(logp_lm[token].exp()),
                              p_knn=0.0, lmbda=s.lmbda if store is not None else 0.0)
            if support_nb is not None:
                nb, w, p_knn = support_nb
                sup.p_knn = float(p_knn[token])
                sup.neighbors = [(int(nb.shard[0, j]), int(nb.ids[0, j]), float(w[j]))
                                 for j in range(nb.tokens.shape[1]) if nb.tokens[0, j] == token]
            if token == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            offset = len(text)  # the completion so far, decoded: this token starts here
            out_ids.append(token)
            text = self.tokenizer.decode(out_ids)
            stop_at = _find_stop(text, stop)
            if stop_at is not None:
                text = text[:stop_at]
                finish = "stop"
                yield GenerationStep(token, text[released:], sup, offset)
                released = len(text)
                break
            safe = len(text) - (max_stop - 1 if max_stop else 0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)  # a multi-byte character is not complete yet
            delta = text[released:max(safe, released)]
            released += len(delta)
            yield GenerationStep(token, delta, sup, offset)
            if len(ids) + len(out_ids) >= self.context_length:
                finish = "length"
                break
            hidden, logits, past = self._forward(torch.tensor([[token]], device=self.device), past=past)
        if released < len(text):
            yield GenerationStep(-1, text[released:], StepSupport(-1, 0.0, 0.0, 0.0, 0.0))
        result.update(finish_reason=finish, text=text, tokens=out_ids)

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def complete(self, prompt: str, attribute: bool = True, **kwargs) -> Completion:
        result: dict = {}
        steps = list(self.generate(prompt, result=result, **kwargs))
        comp = Completion(text=result["text"], tokens=result["tokens"], finish_reason=result["finish_reason"],
                          prompt_tokens=result["prompt_tokens"], steps=steps,
                          store_generation=result["store_generation"])
        if attribute and "ric_blocks" in result:  # mode ric: credit the prepended blocks (silo/ric.py)
            from .ric import ric_attribute
            comp.attributions = ric_attribute(comp.text, result["ric_blocks"])
        elif attribute:
            comp.attributions = self.attribute(comp.text, steps)
        return comp

    # ----------------------------------------------------------------------------------- attribution
    def attribute(self, text: str, steps: Sequence[GenerationStep], max_sources: int = 5,
                  min_share: float = 0.01, store: Datastore | None = None) -> list[SentenceAttribution]:
        """Split generated text into sentences and rank the sources behind each one.

        A token's probability p(y) = (1-lambda) p_LM(y) + sum_i lambda w_i [v_i == y] splits into the
        parametric part and one part per neighbour. A sentence's share for a source is the mean, over the
        sentence's tokens, of the fraction of p(y) that source's neighbours carried; the parametric share
        is the same mean for the LM term, so a sentence's shares sum to 1.
        """
        store = store or self._store
        toks = [st for st in steps if st.token >= 0]
        starts = [st.offset for st in toks]  # where each token starts in the text (recorded by generate)
        spans = sentence_spans(text)
        if not spans:
            return []
        sent_of = sentence_of_offsets(spans, [min(s, len(text)) for s in starts])
        out = []
        for si, (a, b) in enumerate(spans):
            idx = [i for i, s in enumerate(sent_of) if s == si and starts[i] < b]
            if not idx:
                out.append(SentenceAttribution(text[a:b], a, b, 1.0, []))
                continue
            param = 0.0
            by_doc: dict[tuple[int, int], float] = {}
            by_sent: dict[tuple[int, int], dict[int, float]] = {}
            for i in idx:
                sup = toks[i].support
                if sup.p <= 0:
                    continue
                param += (1 - sup.lmbda) * sup.p_parametric / sup.p
                for shard, entry, w in sup.neighbors:
                    if store is None:
                        continue
                    e = store.shards[shard].entries[entry]
                    key = (shard, int(e["doc"]))
                    share = sup.lmbda * w / sup.p
                    by_doc[key] = by_doc.get(key, 0.0) + share
                    by_sent.setdefault(key, {})
                    by_sent[key][int(e["sent"])] = by_sent[key].get(int(e["sent"]), 0.0) + share
            n = len(idx)
            sources = []
            for (shard, doc), mass in sorted(by_doc.items(), key=lambda kv: -kv[1]):
                if mass / n < min_share or len(sources) >= max_sources:
                    break
                d = store.document(shard, doc)
                best = max(by_sent[(shard, doc)].items(), key=lambda kv: kv[1])[0]
                sa, sb = d["sentences"][best] if d["sentences"] else (0, 0)
                sources.append(Source(owner=d["owner"], document_id=d["id"], title=d.get("title", ""),
                                      license=d.get("license", ""), shard=store.shards[shard].name,
                                      sentence=d["text"][sa:sb], share=mass / n))
            out.append(SentenceAttribution(text[a:b], a, b, param / n, sources))
        return out


def _find_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _sample(p: torch.Tensor, temperature: float, top_p: float, top_k: int, gen: torch.Generator) -> int:
    """Sample from probabilities `p` (float64, sums to ~1) with temperature / top-k / top-p."""
    if temperature == 0:
        return int(torch.argmax(p))
    logits = torch.log(p.clamp_min(1e-300)) / temperature
    if top_k and top_k < len(logits):
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, -math.inf), logits)
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs.float(), 1, generator=gen))
