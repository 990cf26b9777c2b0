"""The inf-gram LM (Liu et al. 2024) over the datastore, interpolated through a fitted gate.

p_inf(y | context) = count(suffix + y) / count(suffix), `suffix` the longest suffix of the context (up to
silo.datastore.infgram.MAX_N tokens) that occurs in the store's per-shard suffix arrays; counts are summed
over the shards that hold it. The output is

    p(y) = lambda * p_inf(y) + (1 - lambda) * p_base(y)

with p_base the LM's distribution (mode `infgram`) or the served kNN-LM's (mode `knn+infgram`: the two
stores' evidence combined), and lambda = lambda_max * sigmoid(w . features + b) from evidence, as kNN-LM's
gate (silo/model/gate.py) and fitted by the same machinery (silo/workflows/infgram_fit.py): validation of
every domain and text the LM wrote itself, near-copies of store text left out, a prior, a per-domain guard,
a held-out check and a named fallback. Features:

    log_n        log(1 + effective n): how long a suffix of the context the store holds
    log_total    log of how often that suffix occurs
    top_share    the most frequent continuation's share (1: the store has seen one continuation only)
    log_distinct log of how many distinct continuations
    agree_lm     p_inf of the LM's own top token
    lm_entropy, lm_top_p   the LM's own certainty
    recent_gain, history   how much better than the LM the inf-gram predicted the text just before
                 (an exponential moving average of log p_inf(y) - log p_LM(y), silo/model/evidence.py)

Because every feature reads the store, lambda falls by itself where the store lacks the text (an opt-out
leaves short suffixes and a loss in the recent gain): no re-fitting. A prediction names the stored entries
that carried it (the occurrences of suffix + token), so attribution, notices, the ledger and the verbatim
guard work as for kNN-LM's neighbours.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from silo.core.files import write_json_atomic
from silo.datastore.infgram import MAX_N, Continuations, StoreNgrams
from silo.datastore.store import Datastore

from .attribution import attribute_steps
from .evidence import RecentGain, recent_gain, token_gain
from .knn import mix_logp
from .protocols import SequenceRetrieval
from .sampling import row_values
from .types import LMState, PositionBatch, ScoreResult, SiloInputError, StepSupport

INFGRAM_GATE_FILE = "infgram.json"
INFGRAM_GATE_FORMAT = "silo.infgram_gate.v1"
FEATURES = ("log_n", "log_total", "top_share", "log_distinct", "agree_lm", "lm_entropy", "lm_top_p",
            "recent_gain", "history")
FEATURE_CLIP = 8.0
BASES = ("lm", "knn")  # what the inf-gram is mixed into: the LM alone, or the served kNN-LM
VOTERS = 64  # stored occurrences named per generated token


@dataclass
class PositionStats:
    """The inf-gram's view of N positions: effective n, suffix count, continuation statistics and
    log p_inf of each target (-inf where the store never saw it follow)."""

    n: np.ndarray
    total: np.ndarray
    top_share: np.ndarray
    distinct: np.ndarray
    agree_lm: np.ndarray
    logp: np.ndarray

    @classmethod
    def of(cls, conts: Sequence[Continuations], targets: np.ndarray, lm_top: np.ndarray) -> "PositionStats":
        N = len(conts)
        out = cls(*(np.zeros(N) for _ in range(5)), np.full(N, -np.inf))
        for i, c in enumerate(conts):
            tot = c.total
            if tot == 0:
                continue
            out.n[i], out.total[i], out.distinct[i] = c.n, tot, len(c.tokens)
            out.top_share[i] = c.counts[0] / tot
            hit = np.flatnonzero(c.tokens == targets[i])
            if len(hit):
                out.logp[i] = math.log(c.counts[hit[0]] / tot)
            agree = np.flatnonzero(c.tokens == lm_top[i])
            out.agree_lm[i] = c.counts[agree[0]] / tot if len(agree) else 0.0
        return out

    @property
    def have(self) -> np.ndarray:
        return self.total > 0


def features(st: PositionStats, lm: LMState, recent: np.ndarray) -> np.ndarray:
    """[N, len(FEATURES)] raw features (0 where the store has nothing)."""
    out = np.stack([np.log1p(st.n), np.log1p(st.total), st.top_share, np.log1p(st.distinct), st.agree_lm,
                    lm.entropy, lm.top_p, recent[:, 0], recent[:, 1]], axis=1)
    out[~st.have] = 0.0
    return out


@dataclass
class InfgramGate:
    """A fitted per-token lambda for the inf-gram (see the module docstring); `base` says what it is mixed
    into. mode: gated, or the fallback that passed the fit's check: fixed (fixed_lambda wherever the
    store holds a suffix) or parametric (the inf-gram unused)."""

    base: str
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    lambda_max: float = 0.95
    min_lambda: float = 0.0
    mode: str = "gated"
    fixed_lambda: float = 0.0
    fallback: str = ""
    fingerprint: str = ""
    generation: int = 0
    fitted: str = ""
    report: dict = field(default_factory=dict)
    kind = "gated"

    def lambdas(self, F: np.ndarray, have: np.ndarray) -> np.ndarray:
        if self.mode == "parametric":
            return np.zeros(len(F))
        if self.mode == "fixed":
            return np.where(have, self.fixed_lambda, 0.0)
        x = np.clip((F - np.asarray(self.mean)) / np.asarray(self.std), -FEATURE_CLIP, FEATURE_CLIP)
        z = np.clip(x @ np.asarray(self.weights) + self.bias, -60, 60)
        lam = np.where(have, self.lambda_max / (1.0 + np.exp(-z)), 0.0)
        return np.where(lam >= self.min_lambda, lam, 0.0) if self.min_lambda > 0 else lam

    def describe(self) -> dict:
        out = {"mixture": "gated", "mode": self.mode, "base": self.base, "lambda_max": self.lambda_max,
               "min_lambda": self.min_lambda, "generation": self.generation, "fitted": self.fitted}
        if self.mode == "gated":
            out["weights"] = dict(zip(FEATURES, self.weights))
            out["bias"] = self.bias
        else:
            out.update(lmbda=self.fixed_lambda, fallback=self.fallback)
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "features": list(FEATURES)}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "InfgramGate":
        data = dict(data)
        if data.pop("features", None) != list(FEATURES):
            raise SiloInputError(f"{where}: not an inf-gram gate with features {FEATURES}; fit it again with "
                                 "`silo datastore fit-infgram`", "gate")
        return cls(**data)


def save_gates(store_path: str | Path, gates: dict[str, InfgramGate]) -> Path:
    path = Path(store_path) / INFGRAM_GATE_FILE
    write_json_atomic(path, {"format": INFGRAM_GATE_FORMAT, "gates": {k: g.to_json() for k, g in gates.items()}})
    return path


def load_gates(store: Datastore) -> dict[str, InfgramGate]:
    """The inf-gram gates fitted for `store` ({} when none); refuses gates fitted for another model."""
    path = Path(store.path) / INFGRAM_GATE_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != INFGRAM_GATE_FORMAT:
        raise SiloInputError(f"{path}: format {data.get('format')!r}, expected {INFGRAM_GATE_FORMAT!r}", "gate")
    gates = {k: InfgramGate.from_json(v, str(path)) for k, v in data.get("gates", {}).items()}
    for g in gates.values():
        if g.fingerprint and g.fingerprint != store.fingerprint:
            raise SiloInputError(f"{path}: fitted for model {g.fingerprint[:23]}..., the store is for "
                                 f"{store.fingerprint[:23]}...; fit it again with `silo datastore fit-infgram`", "gate")
    return gates


def position_continuations(ngrams: StoreNgrams, id_lists: Sequence[Sequence[int]],
                           limit: int | None = None) -> list[Continuations]:
    """The continuations at every scored position of each sequence, in `SiloLM.collect_ids`' order (each
    sequence's positions in reading order; position j predicts ids[j + 1] from ids[:j + 1]), the first
    `limit` of them; a suffix grows by at most one token a position, which bounds each search."""
    out = []
    for ids in id_lists:
        ids = [int(t) for t in ids]
        prev = 0
        for j in range(len(ids) - 1):
            if limit is not None and len(out) >= limit:
                return out
            c = ngrams.continuations(ids[:j + 1], upto=prev + 1)
            prev = c.n
            out.append(c)
    return out


@dataclass
class InfState:
    """One sequence's inf-gram state: its last tokens, the suffix length found at the last step, its
    recent-gain average; `base`: the kNN-LM's own state in mode knn+infgram."""

    ids: list[int]
    n: int = 0
    gain: RecentGain = field(default_factory=RecentGain)
    base: object = None

    def push(self, token: int) -> None:
        self.ids = (self.ids + [int(token)])[-(MAX_N + 1):]


@dataclass
class _InfRow:
    """What the inf-gram used at one step of one sequence, kept until its token is chosen."""

    cont: Continuations
    context: list[int]
    lmbda: float
    base: object = None  # the kNN-LM's row (mode knn+infgram)
    p_inf: torch.Tensor | None = None


class InfgramRetriever:
    """The inf-gram over one datastore snapshot (held for the retriever's life), mixed into the LM
    (`base` None, mode "infgram") or into a kNN-LM retriever's served mixture (mode "knn+infgram")."""

    def __init__(self, store: Datastore, ngrams: StoreNgrams, gate: InfgramGate, vocab_size: int, base=None):
        self.store = store
        self.ngrams = ngrams
        self.gate = gate
        self.vocab_size = vocab_size
        self.base = base
        self.mode = "knn+infgram" if base is not None else "infgram"

    @property
    def store_generation(self) -> int:
        return self.store.generation

    @property
    def mixer(self) -> "InfgramRetriever":
        return self

    # ------------------------------------------------------------------------------ scoring
    def mix_positions(self, pos: PositionBatch, id_lists: Sequence[Sequence[int]],
                      base_logp: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, PositionStats]:
        """(log p(target), lambda, the inf-gram's statistics) at every scored position of `id_lists`."""
        if base_logp is None:
            base_logp = self.base.mix_targets(pos) if self.base is not None else pos.logp_lm
        conts = position_continuations(self.ngrams, id_lists, limit=len(pos.targets))
        st = PositionStats.of(conts, pos.targets, pos.lm.top_token)
        recent = recent_gain(token_gain(st.logp, pos.logp_lm), st.have, pos.text_index)
        lam = self.gate.lambdas(features(st, pos.lm, recent), st.have)
        return mix_logp(base_logp, st.logp, lam), lam, st

    def score_ids(self, lm, id_lists: Sequence[Sequence[int]], top: int = 0) -> list[ScoreResult]:
        if top:
            raise SiloInputError.of("logprobs", f"the most probable alternatives are not available in mode "
                                                f"{self.mode} (ask for the token's own log-prob: 0)")
        pos = lm.collect_ids(id_lists)
        logp, lam, _ = self.mix_positions(pos, id_lists)
        out = []
        for ti in range(len(id_lists)):
            sel = pos.text_index == ti
            out.append(ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel],
                                   logp=logp[sel], mode=self.mode, store_generation=self.store_generation,
                                   lmbda=lam[sel]))
        return out

    # ------------------------------------------------------------------------------ generation
    def prepare(self, lm, prompt_ids: list[int], sampling, allowed=None) -> tuple[list[int], SequenceRetrieval]:
        return prompt_ids, SequenceRetrieval()

    def begin_many(self, hiddens, logps, ids_list) -> list:
        bases = self.base.begin_many(hiddens, logps, ids_list) if self.base is not None else [None] * len(ids_list)
        states = []
        for logp, ids, b in zip(logps, ids_list, bases):
            st = InfState(ids=[int(t) for t in ids][-(MAX_N + 1):], n=MAX_N, base=b)  # the first search: unbounded
            n = min(self.WARMUP, len(ids) - 1)
            if n > 0:  # the recent gain over the prompt's last tokens
                tail = [int(t) for t in ids[max(0, len(ids) - 1 - n - MAX_N):]]
                conts = position_continuations(self.ngrams, [tail])[-n:]
                tg = np.asarray(ids[len(ids) - n:], dtype=np.int64)
                lp = logp[len(ids) - 1 - n:len(ids) - 1].gather(1, torch.as_tensor(tg, device=logp.device)[:, None])
                top = logp[len(ids) - 1 - n:len(ids) - 1].argmax(-1).cpu().numpy()
                ps = PositionStats.of(conts, tg, top)
                for g, ok in zip(token_gain(ps.logp, lp[:, 0].double().cpu().numpy()), ps.have):
                    if ok:
                        st.gain.update(float(g))
            states.append(st)
        return states

    WARMUP = 64

    def next_token(self, hidden: np.ndarray, logp_lm: torch.Tensor, states: list, exclude=None):
        if self.base is not None:
            p, base_rows = self.base.next_token(hidden, logp_lm, [s.base for s in states], exclude)
        else:
            p, base_rows = logp_lm.exp(), [None] * len(states)
        lm_state = LMState.of(logp_lm)
        conts = [self.ngrams.continuations(s.ids, upto=s.n + 1) for s in states]
        st = PositionStats.of(conts, np.full(len(states), -1), lm_state.top_token)
        recent = np.array([s.gain.value() for s in states]).reshape(len(states), 2)
        lam = self.gate.lambdas(features(st, lm_state, recent), st.have)
        rows, p = [], p.clone()
        for i, (s, c) in enumerate(zip(states, conts)):
            s.n = c.n
            row = _InfRow(c, list(s.ids), float(lam[i]), base_rows[i])
            if lam[i] > 0:
                q = torch.zeros(self.vocab_size, dtype=p.dtype, device=p.device)
                q[torch.as_tensor(c.tokens, device=p.device)] = torch.as_tensor(c.counts / c.total, dtype=p.dtype,
                                                                                device=p.device)
                row.p_inf = q
                p[i] = float(lam[i]) * q + (1 - float(lam[i])) * p[i]
            rows.append(row)
        return p, rows

    def observe(self, rows: list, tokens: list[int], logp_lm: torch.Tensor, states: list) -> None:
        if self.base is not None:
            self.base.observe([r.base for r in rows], tokens, logp_lm, [s.base for s in states])
        lp = row_values(logp_lm, tokens)
        for row, token, lpt, s in zip(rows, tokens, lp, states):
            c = row.cont
            if c.total:
                hit = np.flatnonzero(c.tokens == token)
                li = math.log(c.counts[hit[0]] / c.total) if len(hit) else -np.inf
                s.gain.update(float(token_gain(np.array([li]), np.array([lpt]))[0]))
            s.push(token)

    def greedy(self, row: _InfRow, p: torch.Tensor, logp_lm: torch.Tensor) -> torch.Tensor:
        """Where the gate's lambda is below 1/2 the base is the more probable source: its choice (the kNN-LM's
        own greedy rule in mode knn+infgram); elsewhere the mixture's (see KNNRetriever.greedy)."""
        if self.gate.mode == "gated" and row.lmbda < 0.5:
            if self.base is not None:
                return self.base.greedy(row.base, self._base_p(row, p), logp_lm)
            return logp_lm.exp()
        return p

    def _base_p(self, row: _InfRow, p: torch.Tensor) -> torch.Tensor:
        if row.p_inf is None:
            return p
        return ((p - row.lmbda * row.p_inf) / (1 - row.lmbda)).clamp_min(0)

    def supports(self, rows: list, tokens: list[int], p: torch.Tensor, logp_lm: torch.Tensor) -> list[StepSupport]:
        """Each row's token with its probabilities and the stored entries that carried it: kNN neighbours
        (mode knn+infgram) and the inf-gram's occurrences, weighted by the mass each carried."""
        if self.base is not None:
            base_p = torch.stack([self._base_p(r, p[i]) for i, r in enumerate(rows)])
            base = self.base.supports([r.base for r in rows], tokens, base_p, logp_lm)
        else:
            pv = row_values(logp_lm, tokens)
            base = [StepSupport(token=t, p=math.exp(x), p_parametric=math.exp(x), p_knn=0.0, lmbda=0.0)
                    for t, x in zip(tokens, pv)]
        pv = row_values(p, tokens)
        return [self._support(r, t, b, pt) for r, t, b, pt in zip(rows, tokens, base, pv)]

    def _support(self, row: _InfRow, token: int, base: StepSupport, p: float) -> StepSupport:
        lam2 = row.lmbda
        lam = 1 - (1 - base.lmbda) * (1 - lam2)  # everything but the LM's own share
        sup = StepSupport(token=token, p=p, p_parametric=base.p_parametric, p_knn=0.0, lmbda=lam)
        parts_s, parts_e, parts_w = [], [], []
        if base.voters is not None and lam > 0:  # kNN mass (1 - lam2) * lam1 * w, as a share of lam
            parts_s.append(base.voters[0])
            parts_e.append(base.voters[1])
            parts_w.append((1 - lam2) * base.lmbda * base.voters[2] / lam)
        c = row.cont
        hit = np.flatnonzero(c.tokens == token)
        if lam2 > 0 and len(hit):
            p_inf = c.counts[hit[0]] / c.total
            sup.p_knn = float(p_inf)
            sh, en = self.ngrams.voters(row.context, c.n, token, VOTERS)
            if len(en):
                parts_s.append(sh)
                parts_e.append(en)
                parts_w.append(np.full(len(en), lam2 * p_inf / len(en) / lam))
        if parts_s:
            sup.voters = (np.concatenate(parts_s), np.concatenate(parts_e), np.concatenate(parts_w))
        return sup

    def documents(self, state: SequenceRetrieval, row: _InfRow | None = None, limit: int = 64) -> np.ndarray:
        """Keys of the documents the step's stored suffix occurs in (and the kNN neighbours' documents)."""
        keys = []
        if row is not None and self.base is not None:
            keys.append(self.base.documents(state, row.base, limit))
        if row is not None and row.cont.n:
            q = row.context[len(row.context) - row.cont.n:]
            hits = self.ngrams.document_hits(q)[:limit]
            keys.append(np.asarray([(s << 32) | d for s, d in hits], dtype=np.int64))
        return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)

    def attribute(self, text, steps, state=None, span_min_chars=None):
        return attribute_steps(text, steps, self.store, span_min_chars=span_min_chars)
