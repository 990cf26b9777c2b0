"""The interfaces of the generation path, written down (`typing.Protocol`): what a retriever, a per-token
mixer and a mixture must offer, and the per-sequence state a retriever hands out.

A retriever object is shared: the serving engine gives every request with the same settings on the same
datastore snapshot one kNN retriever, so their neighbours come from one search per step. Whatever belongs
to one sequence (the blocks RIC-LM prepended to its prompt, its recent-gain average) lives in the
`SequenceRetrieval` that `Retriever.prepare` returns and the sequence holds, never on the retriever.

    retriever.prepare(lm, ids, sampling, allowed) -> (ids the model reads, SequenceRetrieval)
    retriever.mixer                                 -> a TokenMixer (kNN-LM) or None (RIC-LM: the model's own
                                                       distribution over a prompt with blocks prepended)
    mixer.begin_many / next_token / greedy / supports / observe      one decoding step for many sequences
    retriever.documents(state, row) / attribute(text, steps, state)  what the guard follows, who carried it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from silo.datastore.store import Datastore, Neighbors

from .sampling import SamplingParams
from .types import GenerationStep, LMState, ScoreResult, SentenceAttribution, StepSupport


@dataclass
class SequenceRetrieval:
    """One sequence's share of its retriever's state, held by the sequence (a `Decoding`)."""

    blocks: list = field(default_factory=list)  # RIC-LM: (BlockHit, rank share) of the blocks prepended
    step_state: Any = None  # a TokenMixer's per-sequence state (kNN-LM: a RecentGain), from begin_many


class Mixture(Protocol):
    """How much to trust the store at each position: kNN-LM's lambda and p_kNN's bandwidth
    (`FixedMixture`, Khandelwal et al.'s constant; `Gate`, fitted per token)."""

    kind: str  # fixed | gated
    k: int
    needs_history: bool  # reads the recent gain and the context match (the gate's features)

    @property
    def tau_ref(self) -> float: ...  # the distance scale of its features and of the recent gain's p_kNN

    def bonus(self, match: np.ndarray | None) -> np.ndarray | None: ...
    def lambdas(self, nb: Neighbors, store: Datastore, lm: LMState | None, recent: np.ndarray | None = None,
                match: np.ndarray | None = None) -> np.ndarray: ...
    def taus(self, nb: Neighbors) -> np.ndarray | float: ...
    def describe(self) -> dict: ...


class TokenMixer(Protocol):
    """A retriever that mixes its own distribution into every decoding step, for a batch of sequences at
    once (one search per step). `states` are the sequences' `SequenceRetrieval.step_state`s."""

    def begin_many(self, hiddens: Sequence[np.ndarray], logps: Sequence[torch.Tensor],
                   ids_list: Sequence[Sequence[int]]) -> list: ...
    def next_token(self, hidden: np.ndarray, logp_lm: torch.Tensor, states: list,
                   exclude: Sequence[np.ndarray | None] | None = None) -> tuple[torch.Tensor, list]: ...
    def greedy(self, row: Any, p: torch.Tensor, logp_lm: torch.Tensor) -> torch.Tensor: ...
    def supports(self, rows: list, tokens: list[int], p: torch.Tensor, logp_lm: torch.Tensor
                 ) -> list[StepSupport]: ...
    def observe(self, rows: list, tokens: list[int], logp_lm: torch.Tensor, states: list) -> None: ...


class Retriever(Protocol):
    """A datastore snapshot used by scoring and generation (`KNNRetriever`, `RICRetriever`)."""

    mode: str
    store: Datastore

    @property
    def store_generation(self) -> int: ...

    @property
    def mixer(self) -> TokenMixer | None: ...

    def score_ids(self, lm, id_lists: Sequence[Sequence[int]], top: int = 0) -> list[ScoreResult]: ...
    def prepare(self, lm, prompt_ids: list[int], sampling: SamplingParams,
                allowed: Callable[[int, int], bool] | None = None) -> tuple[list[int], SequenceRetrieval]: ...
    def documents(self, state: SequenceRetrieval, row: Any = None) -> np.ndarray: ...
    def attribute(self, text: str, steps: Sequence[GenerationStep], state: SequenceRetrieval,
                  span_min_chars: int | None = None) -> list[SentenceAttribution]: ...
