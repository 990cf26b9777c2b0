"""One request object for a generation: what to continue, how to sample, how to retrieve, what to show.

    GenerationRequest(prompt="To be, or not",
                      sampling=SamplingParams(max_new_tokens=32, temperature=0),
                      retrieval=RetrievalParams(mode="knn"),
                      output=OutputControls(max_verbatim_chars=80, attributions=True))

Each part validates itself when it is made, once, and every refusal is a `SiloInputError` that names the
field by the name it has here (`max_new_tokens`, `k`, `messages[2].role`, ...); the doors (gRPC, HTTP)
convert their wire messages into these objects and rename the field to their own spelling, nothing more.
What a server allows beyond validity (its token limit, prompt length, whether it has a store) is the
server's business (silo.serving.requests.Limits). `SiloLM.start` turns a request into a running `Decoding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from silo.core.licenses import TIERS

from .output_policy import MIN_CAP, OutputPolicy
from .sampling import SamplingParams
from .types import SiloInputError

# ric: retrieval in context (silo/model/ric.py); infgram: the inf-gram over the store's suffix arrays mixed into
# the LM, knn+infgram: into the served kNN-LM (silo/model/infgram.py)
MODES = ("parametric", "knn", "ric", "infgram", "knn+infgram")
AUTO = "auto"  # knn when the model has a store attached, else parametric
MIXTURES = ("gated", "fixed")
RIC_RETRIEVERS = ("bm25", "dense")
MAX_K = 2048
MAX_RIC_BLOCKS = 8
MAX_LOGPROBS = 100  # alternatives per token a request may ask for (a server allows fewer: serve.max_logprobs)
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class RetrievalParams:
    """How the datastore takes part. `mode` auto: kNN-LM when a store is attached, else the LM alone.
    k, lmbda, tau unset: the store's fitted gate (or the LM's fixed settings); setting any asks for the
    fixed mixture with the others from the LM's settings. `ric_retriever`/`ric_blocks`: RIC-LM's index and
    number of blocks (unset: the LM's RIC settings)."""

    mode: str = AUTO
    k: int | None = None
    lmbda: float | None = None
    tau: float | None = None
    mixture: str | None = None  # gated | fixed | None: as the LM's kNN settings say
    skip: str | float | None = None  # retrieval skipping: auto | off | a threshold; None: the LM's settings
    ric_retriever: str | None = None
    ric_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in (AUTO, *MODES):
            raise SiloInputError.of("mode", f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.k is not None and not 1 <= self.k <= MAX_K:
            raise SiloInputError.of("k", f"must be in [1, {MAX_K}] (got {self.k})")
        if self.lmbda is not None and not (math.isfinite(self.lmbda) and 0.0 <= self.lmbda <= 1.0):
            raise SiloInputError.of("lmbda", f"must be in [0, 1] (got {self.lmbda})")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise SiloInputError.of("tau", f"must be a positive number (got {self.tau})")
        if self.mixture not in (None, *MIXTURES):
            raise SiloInputError.of("mixture", f"must be gated or fixed (got {self.mixture!r})")
        if self.ric_retriever not in (None, *RIC_RETRIEVERS):
            raise SiloInputError.of("ric_retriever", f"must be bm25 or dense (got {self.ric_retriever!r})")
        if self.ric_blocks is not None and not 1 <= self.ric_blocks <= MAX_RIC_BLOCKS:
            raise SiloInputError.of("ric_blocks", f"must be in [1, {MAX_RIC_BLOCKS}] (got {self.ric_blocks})")

    @property
    def ric(self) -> dict | None:
        """The RIC settings this request overrides (None: the LM's)."""
        over = {k: v for k, v in (("retriever", self.ric_retriever), ("n_blocks", self.ric_blocks)) if v}
        return over or None


@dataclass(frozen=True)
class OutputControls:
    """What a response may show, tightening the operator's output policy (never loosening it), whether
    the caller gets the per-sentence attributions back (they are computed for every retrieval-mode
    generation anyway: notices and the ledger need them), and the log-probabilities it gets:
    `logprobs` N gives every generated token's log-probability under the distribution it was drawn from
    (the served mixture, before temperature, top-k/top-p and the guard's adjustments) with the N most
    probable alternatives (0: the token's own only; None: none); `echo` also gives the prompt's tokens with
    theirs, scored as `SiloLM.score` scores a text (with N alternatives where `logprobs` is N)."""

    attributions: bool = False
    max_verbatim_chars: int | None = None
    exclude_owners: tuple[str, ...] = ()
    exclude_tiers: tuple[str, ...] = ()
    require_notices: bool = False
    logprobs: int | None = None
    echo: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude_owners", tuple(self.exclude_owners))
        object.__setattr__(self, "exclude_tiers", tuple(self.exclude_tiers))
        if self.max_verbatim_chars is not None and self.max_verbatim_chars < MIN_CAP:
            raise SiloInputError.of("max_verbatim_chars", f"must be >= {MIN_CAP} (got {self.max_verbatim_chars})")
        for i, t in enumerate(self.exclude_tiers):
            if t not in TIERS:
                raise SiloInputError.of(f"exclude_tiers[{i}]", f"unknown tier {t!r}; tiers are {', '.join(TIERS)}")
        for i, o in enumerate(self.exclude_owners):
            if not isinstance(o, str) or not o.strip():
                raise SiloInputError.of(f"exclude_owners[{i}]", "must not be empty")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SiloInputError.of("logprobs", f"must be in [0, {MAX_LOGPROBS}] (got {self.logprobs})")

    @property
    def top_logprobs(self) -> int:
        """Alternatives per token (0 without log-probs)."""
        return self.logprobs or 0

    def policy(self, base: OutputPolicy) -> OutputPolicy:
        """`base` tightened by these controls."""
        return base.restricted(self.max_verbatim_chars, self.exclude_owners, self.exclude_tiers,
                               self.require_notices)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def _messages(messages) -> tuple[ChatMessage, ...]:
    if len(messages) == 0:
        raise SiloInputError.of("messages", "must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        m = m if isinstance(m, ChatMessage) else ChatMessage(m["role"], m["content"])
        if m.role not in CHAT_ROLES:
            raise SiloInputError.of(f"messages[{i}].role", f"unknown role {m.role!r}; expected one of "
                                                          f"{', '.join(CHAT_ROLES)}")
        if not m.content.strip():
            raise SiloInputError.of(f"messages[{i}].content", "must not be empty")
        out.append(m)
    return tuple(out)


@dataclass(frozen=True)
class GenerationRequest:
    """A generation: exactly one of `prompt` (text), `messages` (a chat, rendered with the model's chat
    template) or `prompt_ids` (token ids, BOS included), with its sampling, retrieval and output settings."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    prompt_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    retrieval: RetrievalParams = field(default_factory=RetrievalParams)
    output: OutputControls = field(default_factory=OutputControls)

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "messages", "prompt_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise SiloInputError.of("prompt", "give exactly one of prompt, messages or prompt_ids"
                                              + (f" (got {', '.join(given)})" if given else ""))
        if self.prompt is not None and not self.prompt:
            raise SiloInputError.of("prompt", "must not be empty")
        if self.messages is not None:
            object.__setattr__(self, "messages", _messages(self.messages))
        if self.prompt_ids is not None:
            object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))
            if not self.prompt_ids:
                raise SiloInputError.of("prompt", "must hold at least one token id")
        if self.sampling.max_new_tokens == 0 and not self.output.echo:
            raise SiloInputError.of("max_new_tokens", "must be >= 1 (0 only with echo: the prompt's log-probs "
                                                      "and nothing generated)")

    @property
    def scores_only(self) -> bool:
        """Generates nothing: the prompt's log-probs alone (echo with max_new_tokens 0)."""
        return self.sampling.max_new_tokens == 0

    @property
    def prompt_field(self) -> str:
        """The field a refusal of the prompt names: `messages` for a chat, else `prompt`."""
        return "messages" if self.messages is not None else "prompt"
