"""Per-request sampling settings (like vLLM's `SamplingParams`) and the sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .types import SiloInputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; top_k 0 is off; `stop` strings end the
    completion (the matched text is not returned); the same seed and request give the same text."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(x for x in (self.stop or ()) if x))
        if self.max_new_tokens < 1:
            raise SiloInputError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})", "max_new_tokens")
        if self.temperature < 0:
            raise SiloInputError(f"temperature must be >= 0 (got {self.temperature})", "temperature")
        if not 0 < self.top_p <= 1:
            raise SiloInputError(f"top_p must be in (0, 1] (got {self.top_p})", "top_p")
        if self.top_k < 0:
            raise SiloInputError(f"top_k must be >= 0 (got {self.top_k})", "top_k")

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return torch.Generator().manual_seed(seed)


GREEDY = SamplingParams(temperature=0.0)


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (searching from `start`), or None."""
    hits = [text.find(s, start) for s in stop]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def sample(p: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Sample from probabilities `p` (float64, sums to ~1) with temperature / top-k / top-p."""
    if params.temperature == 0:
        return int(torch.argmax(p))
    logits = torch.log(p.clamp_min(1e-300)) / params.temperature
    if params.top_k and params.top_k < len(logits):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, -math.inf), logits)
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < params.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    # inverse CDF with one uniform draw from the sequence's generator (a seed gives the same text again)
    cdf = torch.cumsum(probs, 0)
    u = torch.rand(1, generator=gen, dtype=cdf.dtype) * cdf[-1]
    return int(min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1))
