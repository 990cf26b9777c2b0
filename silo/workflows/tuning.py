"""Choosing kNN-LM settings on validation data: one search at the largest k, then every (k, lambda, tau)
of a grid scored from it. Used by the evaluation and by the research sweeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import AliasChoices, Field

from silo.core.config import StageConfig
from silo.core.corpus import Document
from silo.datastore.store import Datastore, Neighbors
from silo.model.knn import interpolate, knn_target_logprob
from silo.model.types import PositionBatch


class GridConfig(StageConfig):
    k: list[int] = [16, 64, 256, 1024]  # the fixed row's k is chosen among these
    lmbda: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # tau as multiples of the median top-1 squared distance on the validation keys ("relative"), or
    # absolute values when tau_scale is "absolute" (`temperature`, `temperature_scale`: their old names).
    tau: list[float] = Field([0.1, 0.3, 1.0, 3.0], validation_alias=AliasChoices("tau", "temperature"))
    tau_scale: str = Field("relative", pattern="^(relative|absolute)$",
                           validation_alias=AliasChoices("tau_scale", "temperature_scale"))


def ppl(logp: np.ndarray) -> float:
    return float(math.exp(-np.mean(logp))) if len(logp) else float("nan")


@dataclass
class KnnCache:
    """One search at the largest k, reused for every (k, lambda, tau)."""

    logp_lm: np.ndarray
    targets: np.ndarray
    distances: np.ndarray
    tokens: np.ndarray
    shard: np.ndarray | None = None
    ids: np.ndarray | None = None

    @classmethod
    def search(cls, store: Datastore, pos: PositionBatch, k_max: int) -> "KnnCache":
        nb = store.search(pos.keys, k_max)
        return cls(pos.logp_lm, pos.targets, nb.distances, nb.tokens, nb.shard, nb.ids)

    def neighbors(self) -> Neighbors:
        return Neighbors(self.distances, self.tokens, self.shard, self.ids)

    def logp(self, k: int, lmbda: float, tau: float) -> np.ndarray:
        lk = knn_target_logprob(self.distances[:, :k], self.tokens[:, :k], self.targets, tau)
        return interpolate(self.logp_lm, lk, lmbda)

    def distance_scale(self) -> float:
        """Median top-1 squared distance: the unit of a relative tau grid."""
        top = self.distances[:, 0] if self.distances.shape[1] else np.zeros(0)
        top = top[np.isfinite(top)]
        return float(np.median(top)) if len(top) else 1.0


@dataclass
class Sweep:
    """A validation sweep: every grid point's perplexity, and the best one."""

    distance_scale: float
    rows: list[dict] = field(default_factory=list)  # {k, lmbda, tau, val_ppl}

    @property
    def best(self) -> dict:
        return min(self.rows, key=lambda r: r["val_ppl"])

    @property
    def settings(self) -> dict:
        b = self.best
        return {"k": b["k"], "lmbda": b["lmbda"], "tau": b["tau"]}

    def to_json(self) -> dict:
        return {"distance_scale": self.distance_scale, "rows": self.rows}


def tune(cache: KnnCache, grid: GridConfig) -> Sweep:
    """Score every grid point on the validation cache."""
    scale = cache.distance_scale() or 1.0
    sweep = Sweep(distance_scale=scale)
    for k in grid.k:
        for t in grid.tau:
            tau = t * scale if grid.tau_scale == "relative" else t
            lk = knn_target_logprob(cache.distances[:, :k], cache.tokens[:, :k], cache.targets, tau)
            for lam in grid.lmbda:
                sweep.rows.append({"k": k, "lmbda": lam, "tau": tau,
                                   "val_ppl": ppl(interpolate(cache.logp_lm, lk, lam))})
    return sweep


def domain_texts(docs: list[Document], max_tokens: int, chars_per_token: float = 6.0) -> dict[str, list[str]]:
    """Group documents by domain, keeping roughly enough text for `max_tokens` scored tokens."""
    out: dict[str, list[str]] = {}
    budget: dict[str, float] = {}
    for d in docs:
        dom = d.domain or "default"
        left = budget.setdefault(dom, max_tokens * chars_per_token)
        if left <= 0:
            continue
        text = d.text[: int(left)]
        out.setdefault(dom, []).append(text)
        budget[dom] = left - len(text)
    return out
