"""kNN-LM (Khandelwal et al.): the arithmetic, in log space, and the retriever that applies it.

p_kNN(y) = sum_i softmax(-d_i / tau)_i [v_i == y] over the k nearest keys (squared L2 distance d_i,
value v_i); the output is p(y) = lambda * p_kNN(y) + (1 - lambda) * p_LM(y), lambda weighting the kNN
term. The array functions are vectorised over positions so that a sweep over (k, lambda, tau) reuses
one search at the largest k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import AliasChoices, Field

from silo.core.config import StageConfig
from silo.datastore.store import Datastore, Neighbors

from .attribution import attribute_steps
from .evidence import MATCH_K, RecentGain, recent_gain, token_gain
from .protocols import Mixture, SequenceRetrieval
from .sampling import row_values
from .types import (CONTEXT, GenerationStep, LMState, PositionBatch, ScoreResult, SentenceAttribution, StepSupport,
                    TopTokens)


class KNNConfig(StageConfig):
    # gated: lambda per token from the store's fitted gate (gate.json; see silo/model/gate.py), falling back
    # to the fixed settings below when the store has none; fixed: the constant lambda below
    mixture: Literal["gated", "fixed"] = "gated"
    k: int = Field(32, gt=0)
    lmbda: float = Field(0.3, ge=0.0, le=1.0)  # weight of the kNN distribution (fixed mixture)
    # tau, the bandwidth of p_kNN on squared L2 distances (fixed mixture); `temperature` is its old name
    tau: float = Field(1.0, gt=0.0, validation_alias=AliasChoices("tau", "temperature"))
    # retrieval skipping (gated mixture): "auto" = the threshold fitted with the gate, "off", or a number
    # in [0, 1]: skip the search where the LM-state predictor expects a lambda below it
    skip: Literal["auto", "off"] | float = "auto"


TAU_MIN, TAU_MAX = 1e-30, 1e30  # tau is clipped to this range before dividing by it


def neighbor_log_weights(distances: np.ndarray, tokens: np.ndarray, tau, bonus: np.ndarray | None = None) -> np.ndarray:
    """log softmax(-d / tau + bonus) over each row's valid neighbours ([n, k]; -inf for missing ones); tau
    is one number or one per row; `bonus` [n, <=k] is added to the first neighbours' logits (the gate's
    reward for a neighbour whose context matches the query's)."""
    tau = np.asarray(tau, dtype=np.float64)
    if np.isnan(tau).any():
        raise ValueError("kNN tau is not a number")
    tau = np.clip(tau, TAU_MIN, TAU_MAX)  # a tau that underflowed to 0 or overflowed stays a bandwidth
    with np.errstate(invalid="ignore"):  # inf (a missing neighbour) / inf tau: masked below
        scaled = -distances.astype(np.float64) / (tau[:, None] if tau.ndim else tau)
    if bonus is not None and bonus.shape[1]:
        m = min(bonus.shape[1], scaled.shape[1])
        scaled[:, :m] += bonus[:, :m]
    logits = np.where(tokens >= 0, scaled, -np.inf)
    m = np.max(logits, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row with no neighbour gives nan weights: unused
        lse = m + np.log(np.sum(np.exp(logits - m), axis=1, keepdims=True))
        return logits - lse


def knn_target_logprob(distances: np.ndarray, tokens: np.ndarray, targets: np.ndarray, tau,
                       bonus: np.ndarray | None = None) -> np.ndarray:
    """log p_kNN(target) per row; -inf where no neighbour has the target as value."""
    if tokens.shape[1] == 0:  # no neighbours at all (an empty store)
        return np.full(len(targets), -np.inf)
    lw = neighbor_log_weights(distances, tokens, tau, bonus)
    hit = tokens == targets[:, None]
    masked = np.where(hit, lw, -np.inf)
    m = np.max(masked, axis=1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = m_safe[:, 0] + np.log(np.sum(np.exp(masked - m_safe), axis=1))
    return np.where(np.isfinite(m[:, 0]), out, -np.inf)


def interpolate(logp_lm: np.ndarray, logp_knn: np.ndarray, lmbda: float) -> np.ndarray:
    """log(lambda * p_kNN + (1 - lambda) * p_LM), safe at lambda 0 and 1 and where p_kNN is 0."""
    if lmbda <= 0.0:
        return logp_lm.astype(np.float64)
    if lmbda >= 1.0:
        return logp_knn.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.logaddexp(np.log(lmbda) + logp_knn, np.log1p(-lmbda) + logp_lm)


def mix_logp(logp_lm: np.ndarray, logp_knn: np.ndarray, lmbda: np.ndarray) -> np.ndarray:
    """log(lambda_i * p_kNN + (1 - lambda_i) * p_LM) with a lambda per row; exactly logp_lm where lambda is 0."""
    lam = np.clip(lmbda.astype(np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore"):
        mixed = np.logaddexp(np.log(lam) + logp_knn, np.log1p(-lam) + logp_lm)
    return np.where(lam > 0, mixed, logp_lm.astype(np.float64))


@dataclass
class FixedMixture:
    """Khandelwal et al.'s constant lambda (the paper protocol and research baselines)."""

    k: int
    lmbda: float
    tau: float
    kind: str = "fixed"
    needs_history = False

    @property
    def tau_ref(self) -> float:
        """The distance scale of its features: a fixed mixture has no features, so its own tau."""
        return self.tau

    def bonus(self, match: np.ndarray | None) -> None:
        return None

    def lambdas(self, nb: Neighbors, store: Datastore, lm: LMState | None, recent: np.ndarray | None = None,
                match: np.ndarray | None = None) -> np.ndarray:
        have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(nb.tokens), bool)
        return np.where(have, self.lmbda, 0.0)

    def taus(self, nb: Neighbors) -> float:
        return self.tau

    def describe(self) -> dict:
        return {"mixture": "fixed", "k": self.k, "lmbda": self.lmbda, "tau": self.tau}


def drop_documents(nb: Neighbors, store: Datastore, exclude: Sequence[np.ndarray | None]) -> Neighbors:
    """`nb` without the neighbours of the documents in exclude[i] (store-wide document keys, see
    `Datastore.doc_keys`) in row i; the remaining neighbours keep their order, missing ones go last."""
    if not nb.tokens.shape[1] or not any(x is not None and len(x) for x in exclude):
        return nb
    keys = store.doc_keys(nb)
    gone = np.zeros(keys.shape, bool)
    for i, x in enumerate(exclude):
        if x is not None and len(x):
            gone[i] = np.isin(keys[i], x)
    if not gone.any():
        return nb
    tokens = np.where(gone, -1, nb.tokens).astype(nb.tokens.dtype)
    order = np.argsort(tokens < 0, axis=1, kind="stable")
    dist = np.where(gone, np.inf, nb.distances).astype(nb.distances.dtype)
    return Neighbors(*(np.take_along_axis(x, order, axis=1) for x in (dist, tokens, nb.shard, nb.ids)))


@dataclass
class MixedPositions:
    """The mixture at scored positions: log p(target) [N], lambda [N], and the parts `top` rebuilds it from."""

    logp: np.ndarray
    lmbda: np.ndarray
    nb: Neighbors | None
    tau: np.ndarray | float
    bonus: np.ndarray | None
    fixed: float | None = None  # the fixed mixture's lambda, used at every position (the paper's arithmetic)

    def top(self, pos: PositionBatch, n: int, k: int, vocab_size: int, chunk: int = 256) -> TopTokens:
        """The n most probable tokens at each position under the mixture (needs `pos.logp_rows`)."""
        N = len(pos.targets)
        ids, vals = np.zeros((N, n), np.int64), np.zeros((N, n))
        for s in range(0, N, chunk):
            rows = slice(s, min(N, s + chunk))
            best = torch.topk(self.log_rows(pos, rows, k), min(n, vocab_size), dim=-1)
            ids[rows], vals[rows] = best.indices.numpy(), best.values.numpy()
        return TopTokens(ids, vals)

    def log_rows(self, pos: PositionBatch, rows: slice, k: int) -> torch.Tensor:
        """The mixture's whole next-token log-distribution at positions `rows` ([n, vocab] float64; needs
        `pos.logp_rows`): what `top` ranks, a removal's equivalence check compares and Min-K%++ scores."""
        N = len(pos.targets)
        tau = np.broadcast_to(np.asarray(self.tau, dtype=np.float64), (N,))
        p = torch.from_numpy(pos.logp_rows[rows]).double().exp()
        lam = self.fixed if self.fixed is not None else self.lmbda[rows]
        lam_t = torch.as_tensor(np.broadcast_to(np.asarray(lam, np.float64), (p.shape[0],)).copy())[:, None]
        mixed = (1 - lam_t) * p
        if self.nb is not None and self.nb.tokens.shape[1]:
            toks = self.nb.tokens[rows, :k]
            with np.errstate(invalid="ignore"):
                w = np.exp(neighbor_log_weights(self.nb.distances[rows, :k], toks, tau[rows],
                                                None if self.bonus is None else self.bonus[rows]))
            w = np.where(toks >= 0, np.nan_to_num(w), 0.0)
            p_knn = torch.zeros_like(p).scatter_add_(1, torch.from_numpy(np.maximum(toks, 0).astype(np.int64)),
                                                    torch.from_numpy(w))
            mixed = mixed + lam_t * p_knn
        mixed = torch.where(lam_t > 0, mixed, p)  # lambda 0: the LM's distribution itself
        with np.errstate(divide="ignore"):
            return torch.log(mixed)


@dataclass
class _RowMix:
    """What the mixture used at one position, kept until the token is chosen (for its StepSupport)."""

    neighbors: Neighbors | None  # one row; None when the search was skipped
    weights: np.ndarray | None
    p_knn: torch.Tensor | None
    lmbda: float


class KNNRetriever:
    """kNN-LM over one datastore snapshot, held for the retriever's whole life: a generation or a score
    started on generation G finishes, attributions included, on G even if the server swaps the store.

    `mixture` decides lambda per position: a `FixedMixture` or a fitted `Gate` (silo/model/gate.py).
    `skip` (gated only) is a `SkipPredictor` and `skip_threshold` its threshold: positions predicted to
    get a lambda below it are not searched (lambda 0 there)."""

    mode = "knn"

    def __init__(self, store: Datastore, mixture: Mixture, vocab_size: int, skip=None, skip_threshold: float = 0.0,
                 bos: int = 0):
        self.store = store
        self.mixture = mixture
        self.vocab_size = vocab_size
        self.bos = bos  # the LM's BOS token: the first "context" token of every document
        self.skip = skip if skip is not None and skip_threshold > 0 else None
        self.skip_threshold = skip_threshold
        self.searched = 0  # positions searched / skipped so far (retrieval-skipping statistics)
        self.skipped = 0

    @property
    def k(self) -> int:
        return self.mixture.k

    @property
    def store_generation(self) -> int:
        return self.store.generation

    def search(self, keys: np.ndarray) -> Neighbors:
        return self.store.search(keys, self.k)

    def _search_unskipped(self, keys: np.ndarray, lm: LMState | None) -> tuple[Neighbors, np.ndarray]:
        """Neighbours for the rows the skip predictor lets through (empty rows elsewhere), and that mask."""
        n = len(keys)
        if self.skip is None or lm is None:
            go = np.ones(n, bool)
        else:
            go = self.skip.predict(keys, lm) >= self.skip_threshold
        self.searched += int(go.sum())
        self.skipped += int(n - go.sum())
        if go.all():
            return self.search(keys), go
        nb = Neighbors.empty(n, self.k)
        if go.any():
            part = self.search(keys[go])
            nb = Neighbors.empty(n, part.distances.shape[1])
            for full, got in ((nb.distances, part.distances), (nb.tokens, part.tokens), (nb.shard, part.shard),
                              (nb.ids, part.ids)):
                full[go] = got
        return nb, go

    def match(self, nb: Neighbors, context: np.ndarray) -> np.ndarray | None:
        """Context-match lengths of the first neighbours (gated mixture only)."""
        if not self.mixture.needs_history:
            return None
        return self.store.context_match(nb, context, self.bos, MATCH_K)

    def recent(self, nb: Neighbors, pos: PositionBatch, observed: np.ndarray) -> np.ndarray | None:
        """The recent-gain features of scored positions (reading order), or None for the fixed mixture."""
        if not self.mixture.needs_history:
            return None
        k = self.k
        lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, self.mixture.tau_ref)
        have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(pos.targets), bool)
        return recent_gain(token_gain(lk, pos.logp_lm), observed & have, pos.text_index)

    def lambdas(self, nb: Neighbors, lm: LMState | None, searched: np.ndarray, recent, match) -> np.ndarray:
        return np.where(searched, self.mixture.lambdas(nb, self.store, lm, recent, match), 0.0)

    # ------------------------------------------------------------------------------ scoring
    def mix_targets(self, pos: PositionBatch, nb: Neighbors | None = None) -> np.ndarray:
        """log p(target) under the mixture for each scored position (positions of a text in reading order,
        as `SiloLM.collect` returns them; `nb`: neighbours already searched, at least k per row)."""
        return self.mix_positions(pos, nb).logp

    def mix_positions(self, pos: PositionBatch, nb: Neighbors | None = None) -> "MixedPositions":
        """`mix_targets` with lambda and the parts of the whole distribution (`MixedPositions.top`)."""
        if not len(pos.targets):
            return MixedPositions(pos.logp_lm, np.zeros(0), None, 0.0, None)
        skipping = nb is None and self.skip is not None
        if nb is None:
            nb, searched = self._search_unskipped(pos.keys, pos.lm)
        else:
            searched = np.ones(len(pos.targets), bool)
        k, mix = self.k, self.mixture
        if isinstance(mix, FixedMixture) and not skipping:
            if nb.tokens.shape[1] == 0:
                return MixedPositions(pos.logp_lm.astype(np.float64), np.zeros(len(pos.targets)), None, mix.tau, None)
            lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, mix.tau)
            # the paper's arithmetic, bit for bit: lambda at every position, also where no neighbour came back
            # ((1 - lambda) p_LM there; generation takes the LM alone at such a step)
            return MixedPositions(interpolate(pos.logp_lm, lk, mix.lmbda), np.full(len(pos.targets), mix.lmbda), nb,
                                  mix.tau, None, fixed=mix.lmbda)
        match = self.match(nb, pos.context) if pos.context is not None or not mix.needs_history else None
        tau, bonus = mix.taus(nb), mix.bonus(match)
        lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, tau, bonus)
        lam = self.lambdas(nb, pos.lm, searched, self.recent(nb, pos, searched), match)
        return MixedPositions(mix_logp(pos.logp_lm, lk, lam), lam, nb, tau, bonus)

    def score_ids(self, lm, id_lists: Sequence[Sequence[int]], top: int = 0) -> list[ScoreResult]:
        """Each sequence's tokens scored under the mixture (see `SiloLM.score_ids`); `top` > 0 also gives the
        most probable tokens at each position under it."""
        pos = lm.collect_ids(id_lists, rows=top > 0)
        mixed = self.mix_positions(pos)
        best = mixed.top(pos, top, self.k, self.vocab_size).agree_with(pos.targets, mixed.logp) if top else None
        out = []
        for ti in range(len(id_lists)):
            sel = pos.text_index == ti
            out.append(ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel],
                                   logp=mixed.logp[sel], mode=self.mode, store_generation=self.store_generation,
                                   lmbda=mixed.lmbda[sel], top=best.rows(sel) if best is not None else None))
        return out

    # ------------------------------------------------------------------------------ generation
    WARMUP = 64  # prompt positions whose gain starts a generation's recent-gain average

    @property
    def mixer(self) -> "KNNRetriever":
        """kNN-LM mixes p_kNN into every step: the retriever is its own TokenMixer."""
        return self

    def prepare(self, lm, prompt_ids: list[int], sampling, allowed=None) -> tuple[list[int], SequenceRetrieval]:
        """The prompt as it is (kNN-LM changes the distribution, not the input); the sequence's step state
        comes from `begin_many` once the prompt has run."""
        return prompt_ids, SequenceRetrieval()

    def begin(self, hidden: np.ndarray, logp: torch.Tensor, ids: Sequence[int]):
        """A new sequence's state, from the prompt's forward pass (hidden [T, d] and log-probs [T, V] of its
        positions; position t predicts ids[t + 1]): its last input tokens and the recent-gain average over
        its last WARMUP tokens."""
        return self.begin_many([hidden], [logp], [ids])[0]

    def begin_many(self, hiddens: Sequence[np.ndarray], logps: Sequence[torch.Tensor],
                   ids_list: Sequence[Sequence[int]]) -> list:
        """`begin` for sequences joining together: one search for the prompt positions of all of them."""
        states, keys, targets, lps, spans = [], [], [], [], []
        for hidden, logp, ids in zip(hiddens, logps, ids_list):
            state = RecentGain()
            for t in ids[-CONTEXT:]:
                state.push(t)
            states.append(state)
            if not self.mixture.needs_history or len(ids) < 2:
                continue
            n = min(self.WARMUP, len(ids) - 1)
            rows = slice(len(ids) - 1 - n, len(ids) - 1)
            tg = np.asarray(ids[rows.start + 1:rows.stop + 1], dtype=np.int64)
            keys.append(hidden[rows])
            targets.append(tg)
            lps.append(logp[rows].gather(1, torch.as_tensor(tg, device=logp.device)[:, None])[:, 0].double().cpu())
            spans.append((state, n))
        if not spans:
            return states
        tg = np.concatenate(targets)
        nb = self.search(np.ascontiguousarray(np.concatenate(keys)))
        lk = knn_target_logprob(nb.distances, nb.tokens, tg, self.mixture.tau_ref)
        gains = token_gain(lk, torch.cat(lps).numpy())
        have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(tg), bool)
        at = 0
        for state, n in spans:
            for g, ok in zip(gains[at:at + n], have[at:at + n]):
                if ok:
                    state.update(float(g))
            at += n
        return states

    def next_token(self, hidden: np.ndarray, logp_lm: torch.Tensor, states: list,
                   exclude: Sequence[np.ndarray | None] | None = None) -> tuple[torch.Tensor, list[_RowMix]]:
        """Next-token distributions for a batch of sequences: hidden [B, d] keys, logp_lm [B, V] float64,
        `states` from `begin` (one per sequence); `exclude[i]`: document keys whose neighbours sequence i
        must not use (its VerbatimGuard's `exclude()`)."""
        p = logp_lm.exp()  # [B, V] on the LM's device: the mixture is computed there
        lm_state = LMState.of(logp_lm, p)
        nb, searched = self._search_unskipped(hidden, lm_state)
        if exclude is not None:
            nb = drop_documents(nb, self.store, exclude)
        mix = self.mixture
        recent = match = None
        if mix.needs_history:
            recent = np.array([s.value() for s in states])
            match = self.match(nb, np.stack([s.context_array() for s in states]))
        lam = self.lambdas(nb, lm_state, searched, recent, match)
        tau = np.broadcast_to(np.asarray(mix.taus(nb), dtype=np.float64), (len(hidden),))
        bonus = mix.bonus(match)
        k = self.k
        have = searched & (nb.tokens[:, 0] >= 0) if nb.tokens.shape[1] else np.zeros(len(hidden), bool)
        mixed = np.flatnonzero(lam > 0)
        rows = [_RowMix(nb.rows(slice(i, i + 1)) if have[i] else None, None, None, float(lam[i]))
                for i in range(len(hidden))]
        if len(mixed):  # p_kNN of every mixed row at once: softmax weights scattered onto their tokens
            toks = nb.tokens[mixed, :k]
            w = np.exp(neighbor_log_weights(nb.distances[mixed, :k], toks, tau[mixed],
                                            None if bonus is None else bonus[mixed]))
            w = np.where(toks >= 0, w, 0.0)
            p_knn = torch.zeros((len(mixed), self.vocab_size), dtype=torch.float64)
            p_knn.scatter_add_(1, torch.from_numpy(np.maximum(toks, 0).astype(np.int64)), torch.from_numpy(w))
            p_knn = p_knn.to(device=p.device, dtype=p.dtype)
            lam_t = torch.as_tensor(lam[mixed], dtype=p.dtype, device=p.device)[:, None]
            idx = torch.as_tensor(mixed, device=p.device)
            p = p.index_copy(0, idx, lam_t * p_knn + (1 - lam_t) * p[idx])
            for j, i in enumerate(mixed):
                rows[i].p_knn, rows[i].weights = p_knn[j], w[j]
        return p, rows

    def observe(self, rows: list[_RowMix], tokens: list[int], logp_lm: torch.Tensor, states: list) -> None:
        """The chosen tokens join their sequences' contexts and their gains the recent-gain averages (one
        p_kNN of the chosen token for all rows of the step at once). logp_lm [B, V]: the rows' LM log-probs."""
        if self.mixture.needs_history:
            use = [i for i, (row, st) in enumerate(zip(rows, states)) if st is not None and row.neighbors is not None]
            if use:
                k = self.k
                D = np.concatenate([rows[i].neighbors.distances[:, :k] for i in use])
                T = np.concatenate([rows[i].neighbors.tokens[:, :k] for i in use])
                tok = np.asarray([tokens[i] for i in use], dtype=np.int64)
                lk = knn_target_logprob(D, T, tok, self.mixture.tau_ref)
                lp = logp_lm[torch.as_tensor(use), torch.as_tensor(tok)].double().cpu().numpy()
                for i, g in zip(use, token_gain(lk, lp)):
                    states[i].update(float(g))
        for st, token in zip(states, tokens):
            if st is not None:
                st.push(token)

    def greedy(self, row: _RowMix, p: torch.Tensor, logp_lm: torch.Tensor) -> torch.Tensor:
        """The distribution greedy decoding takes the argmax of: the more probable source's.

        The gate's lambda is how much the evidence says the store holds this passage. Where it is below 1/2
        the LM is the more probable source and greedy decoding takes the LM's choice; a small lambda on a
        peaked p_kNN would otherwise win the mixture's argmax wherever the LM is unsure (a blank line of
        Python documentation continued as a dictionary headword), and the text would follow the store from
        there. Scoring and sampling use the whole mixture; a fixed lambda is the researcher's, used as given."""
        if self.mixture.kind == "gated" and row.lmbda < 0.5:
            return logp_lm.exp()
        return p

    def supports(self, rows: list[_RowMix], tokens: list[int], p: torch.Tensor, logp_lm: torch.Tensor
                 ) -> list[StepSupport]:
        """Why each row's token was chosen at one step (p [B, V] the mixture's, logp_lm [B, V] the LM's):
        its probabilities and the neighbours that voted for it; one gather per tensor for the whole step."""
        pv, lv = row_values(p, tokens), row_values(logp_lm, tokens)
        out = []
        for row, token, pt, lt in zip(rows, tokens, pv, lv):
            sup = StepSupport(token=token, p=pt, p_parametric=math.exp(lt), p_knn=0.0, lmbda=row.lmbda)
            if row.p_knn is not None:
                nb = row.neighbors
                sup.p_knn = float(row.p_knn[token])
                hit = np.flatnonzero(nb.tokens[0, :self.k] == token)  # the neighbours that voted for the token
                sup.voters = (nb.shard[0, hit], nb.ids[0, hit], row.weights[hit])
            out.append(sup)
        return out

    def documents(self, state: SequenceRetrieval, row: _RowMix | None = None, limit: int = 64) -> np.ndarray:
        """Keys of the documents of a step's first `limit` neighbours (what a VerbatimGuard follows)."""
        if row is None or row.neighbors is None:
            return np.zeros(0, np.int64)
        keys = self.store.doc_keys(row.neighbors.truncate(limit))
        return np.unique(keys[keys >= 0])

    def attribute(self, text: str, steps: Sequence[GenerationStep], state: SequenceRetrieval | None = None,
                  span_min_chars: int | None = None) -> list[SentenceAttribution]:
        """Per sentence: the sources whose neighbours voted for its tokens (the steps' supports)."""
        return attribute_steps(text, steps, self.store, span_min_chars=span_min_chars)
