"""kNN-LM arithmetic (Khandelwal et al.), in log space.

p_kNN(y) = sum_i softmax(-d_i / tau)_i [v_i == y] over the k nearest keys (squared L2 distance d_i,
value v_i); the output is p(y) = lambda * p_kNN(y) + (1 - lambda) * p_LM(y), lambda weighting the kNN
term. All functions are vectorised over positions so that a sweep over (k, lambda, tau) reuses one
search at the largest k.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from silo.training.config import StageConfig


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
