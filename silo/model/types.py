"""Records the model layer returns: scores, generation steps, completions and their attributions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class SiloInputError(ValueError):
    """A request to SiloLM is invalid; the message names the argument (`field`, when known)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class PositionBatch:
    """Per scored position of a set of texts: the target token, its LM log-prob and the key."""

    targets: np.ndarray  # [N] int64
    logp_lm: np.ndarray  # [N] float64
    keys: np.ndarray  # [N, d] float32
    text_index: np.ndarray  # [N] int32: which input text each position belongs to

    def truncate(self, n: int) -> "PositionBatch":
        return PositionBatch(self.targets[:n], self.logp_lm[:n], self.keys[:n], self.text_index[:n])


@dataclass
class ScoreResult:
    tokens: list[int]
    logp_parametric: np.ndarray
    logp: np.ndarray  # log-probs under the retriever's mixture (== logp_parametric without one)
    mode: str
    store_generation: int | None = None  # the datastore snapshot that scored it

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
    mode: str = "parametric"
    attributions: list[SentenceAttribution] = field(default_factory=list)
    store_generation: int | None = None
