"""Per-request sampling settings (like vLLM's `SamplingParams`) and the sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .types import SiloInputError


MAX_TEMPERATURE = 100.0
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; top_k 0 is off; `stop` strings end the
    completion (the matched text is not returned); the same seed and request give the same text.
    max_new_tokens 0 generates nothing: only a request that echoes its prompt may ask for it
    (`GenerationRequest` checks). Every rule about these settings is here: an invalid value raises
    `SiloInputError` naming the field."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if self.max_new_tokens < 0:
            raise SiloInputError.of("max_new_tokens", f"must be >= 1 (got {self.max_new_tokens})")
        if not (math.isfinite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE):
            raise SiloInputError.of("temperature", f"must be in [0, {MAX_TEMPERATURE:g}]; 0 is greedy "
                                                   f"(got {self.temperature})")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SiloInputError.of("top_p", f"must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise SiloInputError.of("top_k", f"must be >= 0; 0 is off (got {self.top_k})")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                raise SiloInputError.of(f"stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters (got {s!r})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SiloInputError.of("seed", f"must be in [0, 2^63) (got {self.seed})")

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        return torch.Generator().manual_seed(seed)


def find_stop(text: str, stop: Sequence[str], start: int = 0) -> int | None:
    """Where the first stop string begins in `text` (searching from `start`), or None."""
    hits = [text.find(s, start) for s in stop]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def row_values(t: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    """t[i, tokens[i]] for every row i of t [n, V], as Python floats (one gather)."""
    return t[torch.arange(len(tokens), device=t.device), torch.as_tensor(tokens, device=t.device)].tolist()


def sample(p: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Sample from probabilities `p` [V] (float64, sums to ~1) with temperature / top-k / top-p."""
    return sample_rows(p[None], [params], [gen])[0]


def sample_rows(p: torch.Tensor, params: Sequence[SamplingParams], gens: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `p` [n, V]: row i with `params[i]`, drawing from its own generator `gens[i]`.

    Rows with the same temperature, top-k and top-p are transformed together (a batch's rows mostly share
    them); every operation works row by row, so a row gets the token it would get alone (`sample` is this
    for one row) and a seed gives the same text again, whatever the row is batched with."""
    n, V = p.shape
    out = [0] * n
    groups: dict[tuple, list[int]] = {}
    for i, sp in enumerate(params):
        groups.setdefault((sp.temperature, sp.top_k, sp.top_p), []).append(i)
    for (temperature, top_k, top_p), rows in groups.items():
        sub = p if len(rows) == n else p[rows]
        if temperature == 0:
            tokens = torch.argmax(sub, dim=-1).tolist()
        else:
            logits = torch.log(sub.clamp_min(1e-300)) / temperature
            if top_k and top_k < V:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = torch.where(logits < kth, torch.full_like(logits, -math.inf), logits)
            probs = torch.softmax(logits, dim=-1)
            if top_p < 1.0:
                sorted_p, order = torch.sort(probs, dim=-1, descending=True)
                keep = torch.cumsum(sorted_p, -1) - sorted_p < top_p
                mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)
                probs = torch.where(mask, probs, torch.zeros_like(probs))
                probs = probs / probs.sum(-1, keepdim=True)
            # inverse CDF with one uniform draw per row from its sequence's generator
            cdf = torch.cumsum(probs, -1)
            u = torch.cat([torch.rand(1, generator=gens[i], dtype=cdf.dtype) for i in rows]) * cdf[:, -1]
            tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_max(V - 1).tolist()
        for i, t in zip(rows, tokens):
            out[i] = int(t)
    return out
