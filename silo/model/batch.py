"""Continuous batching: every active sequence advances one token per `step()`.

A step is one batched forward of the sequences' last tokens (their KV caches held together, left-padded
to one length, with an attention mask and explicit position ids), one batched datastore search per
token mixer (sequences made with the same kNN retriever object share it; RIC-LM and parametric rows use
the model's own distribution), then per-sequence mixing, guard, sampling, stop handling and incremental
detokenisation. Sequences join with `add_many` (prompts of
similar length run as one left-padded forward, one search per retriever for their prompt positions, and
their caches are merged into the batch); a sequence leaves when it finishes or is cancelled (its rows
are dropped and padding no sequence needs any more is trimmed).

`SiloLM.start` makes a `Decoding` from a request; `SiloLM.generate` runs one through this decoder, the
serving engine runs many. Each sequence keeps the retriever (and so the datastore snapshot) it was made
with until it finishes, and its own share of the retriever's state (`SequenceRetrieval`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .detok import IncrementalDetokenizer
from .guard import VerbatimGuard
from .output_policy import NO_POLICY, OutputPolicy
from .protocols import Retriever, SequenceRetrieval
from .sampling import SamplingParams, find_stop, row_values, sample_rows
from .types import Completion, GenerationStep, StepSupport, TokenLogprob


def _cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache, [B, heads, T, head_dim] each."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # legacy tuples


def _make_cache(layers):
    from transformers import DynamicCache

    return DynamicCache(layers)


class KVBatch:
    """The KV caches of the active sequences as one left-padded batch."""

    def __init__(self):
        self.layers: list[list[torch.Tensor]] | None = None  # per layer [keys, values], [B, H, T, D]
        self.mask: torch.Tensor | None = None  # [B, T] long: 1 where a row holds a real position
        self.positions: torch.Tensor | None = None  # [B] long: the position id of each row's next token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def add(self, cache, mask: torch.Tensor) -> None:
        """Append sequences as the last rows: their cache from one prefill (`mask` [n, T]: 1 at real positions,
        0 at the left padding of shorter prompts; all ones for a prompt that ran alone)."""
        new = [[k, v] for k, v in _cache_layers(cache)]
        mask = mask.to(dtype=torch.long, device=new[0][0].device)
        pos = mask.sum(1)
        if self.layers is None:
            self.layers, self.mask, self.positions = new, mask, pos
            return
        T = max(self.mask.shape[1], mask.shape[1])
        self.layers = [[torch.cat([_left_pad(a, T), _left_pad(b, T)], dim=0) for a, b in zip(old, one)]
                       for old, one in zip(self.layers, new)]
        self.mask = torch.cat([_left_pad(self.mask, T, dim=1), _left_pad(mask, T, dim=1)], dim=0)
        self.positions = torch.cat([self.positions, pos])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); drop columns that are padding in every kept row."""
        if not rows:
            self.layers = self.mask = self.positions = None
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).nonzero()[0, 0])  # first column some kept row uses
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.layers = [[t.index_select(0, idx)[:, :, start:] for t in kv] for kv in self.layers]

    def cache(self):
        return _make_cache([(k, v) for k, v in self.layers])

    def advanced(self, cache) -> None:
        """After a forward of one token per row with `cache()`: take the grown cache."""
        self.layers = [[k, v] for k, v in _cache_layers(cache)]
        ones = torch.ones((self.rows, 1), dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        self.positions = self.positions + 1


def _left_pad(t: torch.Tensor, T: int, dim: int = 2) -> torch.Tensor:
    n = t.shape[dim]
    if n == T:
        return t
    shape = list(t.shape)
    shape[dim] = T - n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=dim)


PREFILL_PAD_SHARE = 0.5  # at most this share of a joint prefill's positions may be padding


def prefill_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of prompts that run as one left-padded forward: shortest first, a group closed when padding
    would exceed PREFILL_PAD_SHARE of its positions (a long prompt does not make short ones run long)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    real = 0
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) * (1 - PREFILL_PAD_SHARE) <= real + lengths[i]:
            groups[-1].append(i)
            real += lengths[i]
        else:
            groups.append([i])
            real = lengths[i]
    return groups


@dataclass(eq=False)
class Decoding:
    """One generation in a batch: its settings, what it has produced, and the steps not yet taken out.
    Made by `SiloLM.start` (or directly, from prompt ids); `SiloLM.finish` attributes it once done."""

    ids: list[int]  # the prompt the model reads (after the retriever's `prepare`)
    sampling: SamplingParams
    retriever: Retriever | None = None
    guard: VerbatimGuard | None = None
    should_stop: Callable[[], bool] | None = None
    retrieval: SequenceRetrieval = field(default_factory=SequenceRetrieval)  # this sequence's retriever state
    policy: OutputPolicy = field(default_factory=lambda: NO_POLICY)  # the output policy it is generated under (notices, span evidence)
    attribute: bool = True  # `SiloLM.finish` attributes its sentences to their sources
    tag: Any = None  # the caller's record of the request (the serving engine keeps its RequestState here)
    logprobs: int | None = None  # each token's log-prob and this many alternatives (None: no log-probs)
    echo: tuple[str, list[TokenLogprob]] | None = None  # the prompt's text and log-probs, when it asked for them
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    released: int = 0
    steps: list[GenerationStep] = field(default_factory=list)
    pending: list[GenerationStep] = field(default_factory=list)
    completion: Completion | None = None
    _hidden: torch.Tensor | None = None  # [d] input of the output layer at the last position
    _logp: torch.Tensor | None = None  # [V] float64 log-probs of the next token
    _gen: torch.Generator | None = None
    _detok: IncrementalDetokenizer | None = None
    _max_stop: int = 0
    _support: StepSupport | None = None  # the chosen token's, until it is taken in
    _logprob: TokenLogprob | None = None  # the chosen token's (with `logprobs`), until it is taken in
    _end: TokenLogprob | None = None  # the end-of-text token's, when it ended the completion
    _docs: Callable[[], np.ndarray] | None = None  # the documents that carried the step (for the guard)

    @property
    def mixer(self):
        """The retriever's per-step mixer (kNN-LM), or None: the model's own distribution."""
        return self.retriever.mixer if self.retriever is not None else None

    @property
    def done(self) -> bool:
        return self.completion is not None

    def take(self) -> list[GenerationStep]:
        """The steps made since the last call."""
        out, self.pending = self.pending, []
        return out

    def _emit(self, step: GenerationStep) -> None:
        self.steps.append(step)
        self.pending.append(step)


class BatchDecoder:
    """Advances many sequences of one SiloLM together (see the module docstring)."""

    def __init__(self, lm):
        self.lm = lm
        self.seqs: list[Decoding] = []
        self.kv = KVBatch()

    @property
    def active(self) -> int:
        return len(self.seqs)

    def add(self, seq: Decoding) -> Decoding:
        """Run the prompt and put the sequence in the batch (finished at once when it may not generate)."""
        return self.add_many([seq])[0]

    def add_many(self, seqs: list[Decoding]) -> list[Decoding]:
        """Run the prompts of sequences joining together and put them in the batch (`add` for each, cheaper).

        Prompts of similar lengths run as one left-padded forward (`prefill_groups`), and each retriever
        searches the prompt positions of all its new sequences at once (`begin_many`); a prompt alone runs
        unpadded. Each sequence's own positions are taken out of the padded result."""
        lm = self.lm
        seqs_in, seqs = seqs, [s for s in seqs if not s.done]  # a request that generates nothing is done already
        for seq in seqs:
            seq._gen = seq.sampling.generator()
            seq._detok = IncrementalDetokenizer(lm.tokenizer, seq.ids)
            seq._max_stop = max((len(x) for x in seq.sampling.stop), default=0)
        ready = [self._prefill([seqs[i] for i in group]) for group in prefill_groups([len(s.ids) for s in seqs])]
        for past, mask, going in ready:  # the batch changes only once every prompt has run
            if going:
                self.kv.add(past, mask)
                self.seqs.extend(going)
        return seqs_in

    def _prefill(self, seqs: list[Decoding]) -> tuple:
        """One forward of `seqs`' prompts: (their cache, mask, the sequences; each generates >= 1 token)."""
        lm = self.lm
        T = max(len(s.ids) for s in seqs)
        pad = lm.tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (T - len(s.ids)) + list(s.ids) for s in seqs], device=lm.device)
        mask = torch.tensor([[0] * (T - len(s.ids)) + [1] * len(s.ids) for s in seqs], device=lm.device)
        if len(seqs) == 1:
            hidden, logits, past = lm.forward(ids, past=lm._new_cache())
        else:
            hidden, logits, past = lm.forward(ids, mask, past=lm._new_cache(),
                                              position_ids=(mask.cumsum(1) - 1).clamp_min(0))
        last = torch.log_softmax(logits[:, -1].double(), dim=-1)
        by_mixer: dict[int, list[int]] = {}
        for row, seq in enumerate(seqs):
            seq._hidden, seq._logp = hidden[row, -1], last[row]
            if seq.mixer is not None:
                by_mixer.setdefault(id(seq.mixer), []).append(row)
        for rows in by_mixer.values():  # the whole prompt's log-probs only for sequences with a mixer
            mixer = seqs[rows[0]].mixer
            cut = [T - len(seqs[row].ids) for row in rows]  # each row's own positions start here
            states = mixer.begin_many([hidden[row, c:].cpu().numpy() for row, c in zip(rows, cut)],
                                      [torch.log_softmax(logits[row, c:].double(), dim=-1) for row, c in zip(rows, cut)],
                                      [seqs[row].ids for row in rows])
            for row, state in zip(rows, states):
                seqs[row].retrieval.step_state = state
        return past, mask, seqs

    def step(self) -> list[Decoding]:
        """One token for every active sequence; returns the sequences that finished in this step."""
        if not self.seqs:
            return []
        finished: set[int] = set()
        for i, seq in enumerate(self.seqs):
            if seq.should_stop is not None and seq.should_stop():
                self._finish(seq, "cancelled")
                finished.add(i)
        live = [i for i in range(len(self.seqs)) if i not in finished]
        tokens = self._choose(live)
        for i, token in zip(live, tokens):
            if self._advance(self.seqs[i], token):
                finished.add(i)
        going = [i for i in range(len(self.seqs)) if i not in finished]
        done = [self.seqs[i] for i in sorted(finished)]
        if len(going) < len(self.seqs):
            self.kv.keep(going)
            self.seqs = [self.seqs[i] for i in going]
        if self.seqs:
            self._forward([s.out_ids[-1] for s in self.seqs])
        return done

    # ------------------------------------------------------------------------------ one step
    def _choose(self, live: list[int]) -> list[int]:
        """Mix (one search per mixer for all its sequences), guard and sample the next tokens."""
        groups: dict[int, list[int]] = {}
        for i in live:
            groups.setdefault(id(self.seqs[i].mixer), []).append(i)
        chosen: dict[int, int] = {}
        for members in groups.values():
            seqs = [self.seqs[i] for i in members]
            for i, token in zip(members, self._choose_group(seqs)):
                chosen[i] = token
        return [chosen[i] for i in live]

    def _choose_group(self, seqs: list[Decoding]) -> list[int]:
        """The next token of each of `seqs`, which share one mixer (or have none)."""
        mixer = seqs[0].mixer
        logp = torch.stack([s._logp for s in seqs])
        states = [s.retrieval.step_state for s in seqs]
        if mixer is not None:
            hidden = torch.stack([s._hidden for s in seqs]).float().cpu().numpy()
            excl = [s.guard.exclude() if s.guard is not None else None for s in seqs]
            p, mixes = mixer.next_token(hidden, logp, states, exclude=excl if any(e is not None for e in excl) else None)
        else:
            p, mixes = logp.exp(), [None] * len(seqs)
        pick = p
        for row, s in enumerate(seqs):  # greedy kNN rows take the more probable source; guards adjust theirs
            greedy = mixer is not None and s.sampling.temperature == 0
            if greedy or s.guard is not None:
                if pick is p:
                    pick = p.clone()
                one = mixer.greedy(mixes[row], p[row], s._logp) if greedy else p[row]
                pick[row] = one if s.guard is None else s.guard.adjust(one)
        tokens = sample_rows(pick.cpu(), [s.sampling for s in seqs], [s._gen for s in seqs])
        if mixer is not None:  # (the mixture's own p: attribution splits it among its sources)
            sups = mixer.supports(mixes, tokens, p, logp)
            mixer.observe(mixes, tokens, logp, states)
        else:
            got = row_values(p, tokens)
            sups = [StepSupport(token=t, p=x, p_parametric=x, p_knn=0.0, lmbda=0.0) for t, x in zip(tokens, got)]
        self._logprobs(seqs, tokens, p, mixes)
        for row, s in enumerate(seqs):
            s._support = sups[row]
            if s.guard is not None and s.retriever is not None:
                s._docs = lambda s=s, m=mixes[row]: s.retriever.documents(s.retrieval, m)
            elif s.guard is not None:  # the parametric model: the guard follows training documents only
                s._docs = tuple
        return tokens

    def _logprobs(self, seqs: list[Decoding], tokens: list[int], p: torch.Tensor, mixes: list) -> None:
        """The chosen tokens' log-probs under the distribution they were drawn from (the mixture's p, before
        temperature and the guard) with the most probable alternatives, for the sequences that ask."""
        want = [row for row, s in enumerate(seqs) if s.logprobs is not None]
        if not want:
            return
        texts = self.lm.token_texts().texts
        logp = torch.log(p[want].double())  # one log of the step's rows that ask, then per row
        n = max(seqs[row].logprobs for row in want)
        best = torch.topk(logp, min(n, logp.shape[-1]), dim=-1) if n else None
        for j, row in enumerate(want):
            s, token = seqs[row], tokens[row]
            alts = []
            if best is not None and s.logprobs:
                alts = [(int(t), texts[int(t)], float(v))
                        for t, v in zip(best.indices[j, :s.logprobs].tolist(), best.values[j, :s.logprobs].tolist())]
            lam = mixes[row].lmbda if mixes[row] is not None else 0.0
            s._logprob = TokenLogprob(token, texts[token], float(logp[j, token]), float(s._logp[token]), lam, 0, alts)

    def _advance(self, seq: Decoding, token: int) -> bool:
        """Take the chosen token into the sequence; True when the sequence is finished."""
        lm = self.lm
        if token == lm.tokenizer.eos_token_id:
            if seq._logprob is not None:
                seq._end = seq._logprob
                seq._end.offset = len(seq.text)
            self._finish(seq, "stop")
            return True
        offset = len(seq.text)  # this token's text starts here in the completion
        if seq._logprob is not None:
            seq._logprob.offset = offset
        seq.out_ids.append(token)
        seq.text += seq._detok.push(token)
        if seq.guard is not None:
            seq.guard.observe(seq.text, seq._docs(), token)
        stop_at = find_stop(seq.text, seq.sampling.stop, start=max(0, offset - seq._max_stop))
        if stop_at is not None:
            seq.text = seq.text[:stop_at]
            seq._emit(GenerationStep(token, seq.text[seq.released:], seq._support, offset, seq._logprob))
            seq.released = len(seq.text)
            self._finish(seq, "stop", flush=False)
            return True
        safe = len(seq.text) - (seq._max_stop - 1 if seq._max_stop else 0)
        delta = seq.text[seq.released:max(safe, seq.released)]
        seq.released += len(delta)
        seq._emit(GenerationStep(token, delta, seq._support, offset, seq._logprob))
        if len(seq.ids) + len(seq.out_ids) >= lm.context_length or len(seq.out_ids) >= seq.sampling.max_new_tokens:
            self._finish(seq, "length")
            return True
        return False

    def _finish(self, seq: Decoding, reason: str, flush: bool = True) -> None:
        if flush:
            seq.text += seq._detok.flush()
        if seq.released < len(seq.text):
            seq._emit(GenerationStep(-1, seq.text[seq.released:], StepSupport(-1, 0.0, 0.0, 0.0, 0.0)))
            seq.released = len(seq.text)
        r = seq.retriever
        seq.completion = Completion(text=seq.text, tokens=seq.out_ids, finish_reason=reason, prompt_tokens=len(seq.ids),
                                    steps=seq.steps, mode=r.mode if r is not None else "parametric",
                                    store_generation=r.store_generation if r is not None else None,
                                    guard_events=seq.guard.events if seq.guard is not None else [],
                                    logprobs=self._taken_logprobs(seq))

    @staticmethod
    def _taken_logprobs(seq: Decoding) -> list[TokenLogprob] | None:
        if seq.logprobs is None:
            return None
        return [st.logprob for st in seq.steps if st.logprob is not None] + ([seq._end] if seq._end else [])

    def _forward(self, tokens: list[int]) -> None:
        lm, kv = self.lm, self.kv
        ids = torch.tensor(tokens, dtype=torch.long, device=lm.device)[:, None]
        cache = kv.cache()
        mask = torch.cat([kv.mask, torch.ones((kv.rows, 1), dtype=torch.long, device=kv.mask.device)], dim=1)
        hidden, logits, past = lm.forward(ids, mask, past=cache, position_ids=kv.positions[:, None])
        kv.advanced(past)
        logp = torch.log_softmax(logits[:, -1].double(), dim=-1)
        for row, seq in enumerate(self.seqs):
            seq._hidden, seq._logp = hidden[row, -1], logp[row]
