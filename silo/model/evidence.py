"""Evidence about a passage that the gated mixture reads besides the neighbours themselves: how well the
store has been predicting the text so far (recent gain) and the context the query was read in (for the
context match against the neighbours'). Used by the kNN retriever and the gate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .types import CONTEXT

MATCH_K = 64  # neighbours whose context is compared with the query's
DECAY = 0.95  # of the recent-gain average: about the last 20 tokens
GAIN_CLIP = 10.0


def token_gain(logp_knn_ref: np.ndarray, logp_lm: np.ndarray) -> np.ndarray:
    """log p_kNN(y) - log p_LM(y) per position (kNN at the reference tau), clipped to +-GAIN_CLIP."""
    with np.errstate(invalid="ignore"):
        return np.clip(np.nan_to_num(logp_knn_ref - logp_lm, nan=-GAIN_CLIP, neginf=-GAIN_CLIP), -GAIN_CLIP, GAIN_CLIP)


@dataclass
class RecentGain:
    """The running recent-gain average of one sequence (generation); `update` after each observed token.
    `context` holds the sequence's last input tokens, most recent first (for the context match)."""

    total: float = 0.0
    weight: float = 0.0
    context: list[int] = field(default_factory=list)

    def push(self, token: int) -> None:
        self.context = ([int(token)] + self.context)[:CONTEXT]

    def context_array(self) -> np.ndarray:
        out = np.full(CONTEXT, -1, dtype=np.int64)
        out[:len(self.context)] = self.context
        return out

    def value(self) -> tuple[float, float]:
        return (self.total / self.weight if self.weight > 0 else 0.0), self.weight * (1 - DECAY)

    def update(self, gain: float) -> None:
        self.total = DECAY * self.total + gain
        self.weight = DECAY * self.weight + 1.0


def recent_gain(gain: np.ndarray, observed: np.ndarray, text_index: np.ndarray) -> np.ndarray:
    """[n, 2] (recent_gain, history) for positions in reading order: each row sees only the earlier rows of
    its text whose gain was observed (searched, with neighbours)."""
    out = np.zeros((len(gain), 2))
    state = RecentGain()
    for t in range(len(gain)):
        if t and text_index[t] != text_index[t - 1]:
            state = RecentGain()
        out[t] = state.value()
        if observed[t]:
            state.update(float(gain[t]))
    return out
