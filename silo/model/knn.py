"""kNN-LM (Khandelwal et al.): the arithmetic, in log space, and the retriever that applies it.

p_kNN(y) = sum_i softmax(-d_i / tau)_i [v_i == y] over the k nearest keys (squared L2 distance d_i,
value v_i); the output is p(y) = lambda * p_kNN(y) + (1 - lambda) * p_LM(y), lambda weighting the kNN
term. The array functions are vectorised over positions so that a sweep over (k, lambda, tau) reuses
one search at the largest k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from pydantic import Field

from silo.core.config import StageConfig
from silo.datastore.store import Datastore, Neighbors

from .attribution import attribute_steps
from .types import GenerationStep, PositionBatch, ScoreResult, SentenceAttribution, StepSupport


class KNNConfig(StageConfig):
    k: int = Field(32, gt=0)
    lmbda: float = Field(0.3, ge=0.0, le=1.0)  # weight of the kNN distribution
    temperature: float = Field(1.0, gt=0.0)  # tau, on squared L2 distances


def neighbor_log_weights(distances: np.ndarray, tokens: np.ndarray, tau: float) -> np.ndarray:
    """log softmax(-d / tau) over each row's valid neighbours ([n, k]; -inf for missing ones)."""
    logits = np.where(tokens >= 0, -distances.astype(np.float64) / tau, -np.inf)
    m = np.max(logits, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    lse = m + np.log(np.sum(np.exp(logits - m), axis=1, keepdims=True))
    return logits - lse


def knn_target_logprob(distances: np.ndarray, tokens: np.ndarray, targets: np.ndarray, tau: float) -> np.ndarray:
    """log p_kNN(target) per row; -inf where no neighbour has the target as value."""
    lw = neighbor_log_weights(distances, tokens, tau)
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


def knn_distribution(distances: np.ndarray, tokens: np.ndarray, tau: float, vocab_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """p_kNN over the vocabulary for one position, and each neighbour's weight ([k])."""
    w = np.exp(neighbor_log_weights(distances[None], tokens[None], tau)[0])
    p = torch.zeros(vocab_size, dtype=torch.float64)
    valid = tokens >= 0
    if valid.any():
        p.index_add_(0, torch.from_numpy(tokens[valid].astype(np.int64)), torch.from_numpy(w[valid]))
    return p, w


@dataclass
class _RowMix:
    """What the mixture used at one position, kept until the token is chosen (for its StepSupport)."""

    neighbors: Neighbors  # one row
    weights: np.ndarray
    p_knn: torch.Tensor
    lmbda: float


class KNNRetriever:
    """kNN-LM over one datastore snapshot, held for the retriever's whole life: a generation or a score
    started on generation G finishes, attributions included, on G even if the server swaps the store."""

    mode = "knn"

    def __init__(self, store: Datastore, settings: KNNConfig, vocab_size: int):
        self.store = store
        self.settings = settings
        self.vocab_size = vocab_size

    @property
    def store_generation(self) -> int:
        return self.store.generation

    def search(self, keys: np.ndarray) -> Neighbors:
        return self.store.search(keys, self.settings.k)

    # ------------------------------------------------------------------------------ scoring
    def mix_targets(self, pos: PositionBatch, nb: Neighbors | None = None) -> np.ndarray:
        """log p(target) under the mixture for each scored position."""
        if not len(pos.targets):
            return pos.logp_lm
        s = self.settings
        nb = nb if nb is not None else self.search(pos.keys)
        return interpolate(pos.logp_lm, knn_target_logprob(nb.distances, nb.tokens, pos.targets, s.temperature),
                           s.lmbda)

    def score(self, lm, texts: Sequence[str]) -> list[ScoreResult]:
        pos = lm.collect(texts)
        logp = self.mix_targets(pos)
        out = []
        for ti in range(len(texts)):
            sel = pos.text_index == ti
            out.append(ScoreResult(tokens=pos.targets[sel].tolist(), logp_parametric=pos.logp_lm[sel],
                                   logp=logp[sel], mode=self.mode, store_generation=self.store_generation))
        return out

    # ------------------------------------------------------------------------------ generation
    def prepare(self, lm, prompt: str, prompt_ids: list[int], sampling) -> list[int]:
        return prompt_ids

    def next_token(self, hidden: np.ndarray, logp_lm: torch.Tensor) -> tuple[torch.Tensor, list[_RowMix]]:
        """Next-token distributions for a batch of positions: hidden [B, d] keys, logp_lm [B, V] float64."""
        s = self.settings
        nb = self.search(hidden)
        rows, ps = [], []
        for i in range(len(hidden)):
            p_knn, w = knn_distribution(nb.distances[i], nb.tokens[i], s.temperature, self.vocab_size)
            ps.append(s.lmbda * p_knn + (1 - s.lmbda) * logp_lm[i].exp())
            rows.append(_RowMix(nb.rows(slice(i, i + 1)), w, p_knn, s.lmbda))
        return torch.stack(ps), rows

    def support(self, row: _RowMix, token: int, p: torch.Tensor, logp_lm: torch.Tensor) -> StepSupport:
        nb = row.neighbors
        return StepSupport(token=token, p=float(p[token]), p_parametric=float(logp_lm[token].exp()),
                           p_knn=float(row.p_knn[token]), lmbda=row.lmbda,
                           neighbors=[(int(nb.shard[0, j]), int(nb.ids[0, j]), float(row.weights[j]))
                                      for j in range(nb.tokens.shape[1]) if nb.tokens[0, j] == token])

    def attribute(self, text: str, steps: Sequence[GenerationStep], extra=None) -> list[SentenceAttribution]:
        return attribute_steps(text, steps, self.store)
