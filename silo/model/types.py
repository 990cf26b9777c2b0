"""Records the model layer returns: scores, generation steps, completions and their attributions."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


CONTEXT = 8  # input tokens kept per position for matching a neighbour's context (silo.datastore.store)


def context_of(ids, i: int) -> np.ndarray:
    """The CONTEXT input tokens ending at position i of `ids`, most recent first (-1 before the start)."""
    out = np.full(CONTEXT, -1, dtype=np.int64)
    back = ids[max(0, i - CONTEXT + 1): i + 1][::-1]
    out[:len(back)] = back
    return out


class SiloInputError(ValueError):
    """A request to SiloLM is invalid; the message names the argument (`field`, when known).

    Made with `of(field, reason)` the message is "field: reason" and both parts stay apart, so a door that
    spells the field differently (gRPC's `params.max_tokens` for `max_new_tokens`) renames it without
    parsing the message (`renamed`)."""

    def __init__(self, message: str, field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.field = field
        self.reason = reason

    def __reduce__(self):  # pickles with its field (between processes)
        return type(self), (str(self), self.field, self.reason)

    @classmethod
    def of(cls, field: str, reason: str) -> "SiloInputError":
        return cls(f"{field}: {reason}", field, reason)

    def renamed(self, field: str) -> "SiloInputError":
        """The same error, naming the field `field`."""
        return SiloInputError.of(field, self.reason if self.reason is not None else str(self))


@dataclass
class LMState:
    """What the LM's own next-token distribution says at each position (the gate's LM features)."""

    entropy: np.ndarray  # [N] float64, nats
    top_token: np.ndarray  # [N] int64, argmax
    top_p: np.ndarray  # [N] float64, its probability

    @classmethod
    def of(cls, logp, p=None) -> "LMState":
        """From log-probabilities [N, V] (torch), and their exp when the caller has it."""
        import torch

        p = logp.exp() if p is None else p
        top_p, top = torch.max(p, dim=-1)
        ent = -(p * logp.clamp_min(-1e30)).sum(-1)
        return cls(ent.double().cpu().numpy(), top.cpu().numpy().astype(np.int64), top_p.double().cpu().numpy())

    def rows(self, sel) -> "LMState":
        return LMState(self.entropy[sel], self.top_token[sel], self.top_p[sel])

    @classmethod
    def concat(cls, parts: list["LMState"]) -> "LMState":
        return cls(np.concatenate([x.entropy for x in parts]), np.concatenate([x.top_token for x in parts]),
                   np.concatenate([x.top_p for x in parts]))

    @classmethod
    def empty(cls) -> "LMState":
        return cls(np.zeros(0), np.zeros(0, np.int64), np.zeros(0))


@dataclass
class PositionBatch:
    """Per scored position of a set of texts: the target token, its LM log-prob, the key and the LM state."""

    targets: np.ndarray  # [N] int64
    logp_lm: np.ndarray  # [N] float64
    keys: np.ndarray  # [N, d] float32
    text_index: np.ndarray  # [N] int32: which input text each position belongs to
    lm: LMState = None  # type: ignore[assignment]
    context: np.ndarray = None  # type: ignore[assignment]  # [N, CONTEXT] input tokens, most recent first
    # asked for by scoring with top alternatives (`SiloLM.collect_ids(top=..., rows=...)`), else None:
    top: "TopTokens | None" = None  # the LM's own most probable next tokens at each position
    logp_rows: np.ndarray | None = None  # [N, V] float32: the LM's whole next-token log-distribution

    def rows(self, sel) -> "PositionBatch":
        return PositionBatch(self.targets[sel], self.logp_lm[sel], self.keys[sel], self.text_index[sel],
                             self.lm.rows(sel) if self.lm is not None else None,
                             self.context[sel] if self.context is not None else None,
                             self.top.rows(sel) if self.top is not None else None,
                             self.logp_rows[sel] if self.logp_rows is not None else None)

    def truncate(self, n: int) -> "PositionBatch":
        return self.rows(slice(0, n))

    @classmethod
    def concat(cls, parts: list["PositionBatch"]) -> "PositionBatch":
        """One batch of several, text indices renumbered so texts of different parts stay apart."""
        offsets = np.cumsum([0] + [int(p.text_index.max()) + 1 if len(p.text_index) else 0 for p in parts[:-1]])
        return cls(np.concatenate([p.targets for p in parts]), np.concatenate([p.logp_lm for p in parts]),
                   np.ascontiguousarray(np.concatenate([p.keys for p in parts])),
                   np.concatenate([p.text_index + o for p, o in zip(parts, offsets)]).astype(np.int32),
                   LMState.concat([p.lm for p in parts]), np.concatenate([p.context for p in parts]))


@dataclass
class TopTokens:
    """The most probable next tokens at each of N positions, most probable first: ids [N, n] and their
    log-probabilities [N, n] (float64)."""

    ids: np.ndarray
    logp: np.ndarray

    def rows(self, sel) -> "TopTokens":
        return TopTokens(self.ids[sel], self.logp[sel])

    @classmethod
    def concat(cls, parts: list["TopTokens"]) -> "TopTokens":
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.logp for p in parts]))

    def agree_with(self, targets: np.ndarray, logp: np.ndarray) -> "TopTokens":
        """Where a position's own token is among its alternatives, its log-prob there is exactly `logp`'s
        (the two come from separate arithmetic; a reader comparing them for equality, as lm-eval's is_greedy
        does, must find the same number)."""
        vals = np.where(self.ids == np.asarray(targets)[:, None], np.asarray(logp, np.float64)[:, None], self.logp)
        return TopTokens(self.ids, vals)


@dataclass
class ScoreResult:
    tokens: list[int]
    logp_parametric: np.ndarray
    logp: np.ndarray  # log-probs under the retriever's mixture (== logp_parametric without one)
    mode: str
    store_generation: int | None = None  # the datastore snapshot that scored it
    lmbda: np.ndarray | None = None  # the kNN weight at each position (kNN-LM; None: 0 everywhere)
    top: TopTokens | None = None  # the most probable tokens at each position under the same distribution

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
    # the neighbours whose value is the token, as arrays: shard index, entry id, normalised weight
    voters: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def neighbors(self) -> list[tuple[int, int, float]]:
        """(shard, entry id, weight) of each neighbour that voted for the token."""
        if self.voters is None:
            return []
        shard, entry, weight = self.voters
        return list(zip(shard.tolist(), entry.tolist(), weight.tolist()))


@dataclass
class TokenLogprob:
    """One token of a prompt or a completion with its log-probability under the distribution that scored
    or generated it (the served mixture: kNN-LM's p = lambda * p_kNN + (1 - lambda) * p_LM, RIC-LM's or the
    LM's own), and the most probable alternatives at that position under the same distribution."""

    token: int
    text: str  # the token's text as it reads after a word (see silo.model.guard.TokenTexts)
    logprob: float | None  # None: the first token of a prompt given as ids (nothing came before it)
    logprob_parametric: float | None = None  # the LM alone
    lmbda: float = 0.0  # the kNN weight at this position (0: parametric, RIC-LM, or no neighbour)
    offset: int = 0  # characters into the prompt (or the completion) where the token's text starts
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), most probable first


@dataclass
class GenerationStep:
    token: int
    text: str  # the text this step releases (may be empty while a multi-byte character or stop is pending)
    support: StepSupport
    offset: int = 0  # character offset in the completion where this token's text starts (for attribution)
    logprob: TokenLogprob | None = None  # when the generation was asked for log-probs


@dataclass
class Source:
    owner: str
    document_id: str
    title: str
    license: str
    shard: str
    sentence: str
    share: float
    source: str = ""  # the document's `source` field (where the text came from)
    url: str = ""


@dataclass
class Span:
    """Verbatim evidence: completion text[start:end] == the document's stored text[doc_start:doc_end]."""

    document_id: str
    owner: str
    shard: str
    start: int
    end: int
    doc_start: int
    doc_end: int


@dataclass
class TrainingSpan:
    """A span of the output found verbatim in the model's training data (silo/model/trace.py):
    completion text[start:end] == the training document's text[doc_start:doc_end]; `count` is how often
    the span's tokens occur in the training stream (its documents: the first few, listed one span each)."""

    document_id: str
    owner: str
    license: str
    title: str
    source: str
    url: str
    tier: str
    start: int
    end: int
    doc_start: int
    doc_end: int
    count: int = 1


@dataclass
class SentenceAttribution:
    sentence: str
    start: int
    end: int
    parametric_share: float
    sources: list[Source]
    other_share: float = 0.0  # the sources below the listing cut, together: all the shares sum to 1
    spans: list[Span] = field(default_factory=list)  # verbatim spans of the sentence in its sources' documents
    tokens: int = 0  # generated tokens that start in the sentence (a source's credit: share * tokens)
    # spans of the sentence found verbatim in the model's training data (beside the datastore's `spans`)
    training: list[TrainingSpan] = field(default_factory=list)


@dataclass
class Notice:
    """A licence notice a response carries for a source whose licence (by output policy) requires one."""

    document_id: str
    title: str
    owner: str
    license: str
    source: str
    url: str = ""
    share: float = 0.0  # the source's largest share of one sentence
    origin: str = "datastore"  # datastore | training (a verbatim span of a training document)

    def text(self) -> str:
        where = self.url or self.source
        return (f"\"{self.title or self.document_id}\" by {self.owner}, licensed under {self.license or 'unknown terms'}"
                + (f"; source: {where}" if where else ""))


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
    notices: list[Notice] = field(default_factory=list)  # licence notices its sources require (output policy)
    guard_events: list = field(default_factory=list)  # silo.model.guard.GuardEvent: where the guard steered
    # with OutputControls.logprobs: each generated token's, and the end-of-text token's when it ended the
    # completion (it is not part of `tokens` or the text)
    logprobs: list[TokenLogprob] | None = None
    # with OutputControls.echo: the prompt's tokens scored as `SiloLM.score` scores them, and its text
    prompt_logprobs: list[TokenLogprob] | None = None
    prompt_text: str | None = None
