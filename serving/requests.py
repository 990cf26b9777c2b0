"""Turn wire messages into validated requests. Every rejection names the offending field.

Validation happens here, before a request takes a queue slot, so a bad request costs the server
nothing; only the prompt's token length is checked later, on the worker (it needs the tokenizer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from silo.core.licenses import TIERS
from silo.model.output_policy import MIN_CAP
from silo.model.types import SiloInputError

# Modes the server accepts. SiloLM also knows "ric" (retrieval in context); it needs per-request
# retrieval settings that silo.v1 does not carry yet, so it is refused here until the proto grows them.
SERVED_MODES = ("parametric", "knn", "ric")
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_CHARS = 64
MAX_K = 2048


class InvalidRequest(SiloInputError):
    """A request field is invalid; `field` is its path in the request message."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field)


@dataclass(frozen=True)
class Limits:
    max_tokens_default: int
    max_tokens_limit: int
    max_stop_sequences: int
    vocab_size: int
    has_store: bool
    has_blocks: bool = False  # the store carries RIC-LM blocks (silo datastore build-blocks)
    max_score_chars: int = 1 << 20  # a cheap bound before tokenizing; tokens are checked on the worker
    max_prompt_chars: int = 32_768  # prompt / all chat messages together, before queueing
    max_messages: int = 64


@dataclass
class GenRequest:
    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    mode: str = "knn"
    k: int | None = None
    lmbda: float | None = None
    tau: float | None = None
    attributions: bool = False
    prompt_field: str = "prompt"  # for error messages: "prompt" or "messages"
    # output controls: only ever tighten the server's output_policy
    max_verbatim_chars: int | None = None
    exclude_owners: list[str] = field(default_factory=list)
    exclude_tiers: list[str] = field(default_factory=list)
    require_notices: bool = False
    # RIC-LM (mode ric): which block index and how many blocks; None = the server's settings
    ric_retriever: str | None = None
    ric_blocks: int | None = None


@dataclass
class ScoreRequest:
    text: str
    mode: str
    k: int | None = None
    lmbda: float | None = None
    tau: float | None = None


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def _mode(value: str, name: str, limits: Limits) -> str:
    mode = value or ("knn" if limits.has_store else "parametric")
    if mode not in SERVED_MODES:
        raise InvalidRequest(name, f"unknown mode {value!r}; expected one of {', '.join(SERVED_MODES)}")
    if mode == "knn" and not limits.has_store:
        raise InvalidRequest(name, "mode 'knn' needs a datastore and this server has none; use 'parametric'")
    if mode == "ric" and not limits.has_blocks:
        raise InvalidRequest(name, "mode 'ric' needs a datastore with RIC-LM blocks and this server's store has "
                                   "none (silo datastore build-blocks); use 'knn' or 'parametric'")
    return mode


def _knn_overrides(msg, prefix: str) -> dict:
    k, lmbda, tau = _opt(msg, "k"), _opt(msg, "lmbda"), _opt(msg, "tau")
    if k is not None and not 1 <= k <= MAX_K:
        raise InvalidRequest(f"{prefix}k", f"must be in [1, {MAX_K}] (got {k})")
    if lmbda is not None and not (math.isfinite(lmbda) and 0.0 <= lmbda <= 1.0):
        raise InvalidRequest(f"{prefix}lmbda", f"must be in [0, 1] (got {lmbda})")
    if tau is not None and not (math.isfinite(tau) and tau > 0):
        raise InvalidRequest(f"{prefix}tau", f"must be a positive number (got {tau})")
    return dict(k=k, lmbda=lmbda, tau=tau)


def generation_request(prompt: str, params, limits: Limits, prompt_field: str = "prompt") -> GenRequest:
    """Validate a GenerationParams message (`params`) for `prompt`."""
    p = "params."
    max_tokens = _opt(params, "max_tokens")
    if max_tokens is None:
        max_tokens = limits.max_tokens_default
    elif not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(p + "max_tokens", f"must be in [1, {limits.max_tokens_limit}] (got {max_tokens})")
    temperature = _opt(params, "temperature")
    temperature = 1.0 if temperature is None else temperature
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 100.0):
        raise InvalidRequest(p + "temperature", f"must be in [0, 100]; 0 is greedy (got {temperature})")
    top_p = _opt(params, "top_p")
    top_p = 1.0 if top_p is None else top_p
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest(p + "top_p", f"must be in (0, 1] (got {top_p})")
    top_k = _opt(params, "top_k") or 0
    if not 0 <= top_k <= limits.vocab_size:
        raise InvalidRequest(p + "top_k", f"must be in [0, {limits.vocab_size}]; 0 is off (got {top_k})")
    stop = list(params.stop)
    if len(stop) > limits.max_stop_sequences:
        raise InvalidRequest(p + "stop", f"at most {limits.max_stop_sequences} sequences (got {len(stop)})")
    for i, s in enumerate(stop):
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidRequest(f"{p}stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters (got {len(s)})")
    seed = _opt(params, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidRequest(p + "seed", f"must be >= 0 (got {seed})")
    return GenRequest(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                      stop=stop, seed=seed, mode=_mode(params.mode, p + "mode", limits),
                      attributions=params.return_attributions, prompt_field=prompt_field,
                      **_knn_overrides(params, p), **_output_controls(params, p), **_ric_overrides(params, p))


MAX_RIC_BLOCKS = 8


def _ric_overrides(msg, prefix: str) -> dict:
    retriever = getattr(msg, "ric_retriever", "") or None
    if retriever is not None and retriever not in ("bm25", "dense"):
        raise InvalidRequest(f"{prefix}ric_retriever", f"must be bm25 or dense (got {retriever!r})")
    blocks = _opt(msg, "ric_blocks") if hasattr(msg, "ric_blocks") else None
    if blocks is not None and not 1 <= blocks <= MAX_RIC_BLOCKS:
        raise InvalidRequest(f"{prefix}ric_blocks", f"must be in [1, {MAX_RIC_BLOCKS}] (got {blocks})")
    return dict(ric_retriever=retriever, ric_blocks=blocks)


def _output_controls(msg, prefix: str) -> dict:
    cap = _opt(msg, "max_verbatim_chars")
    if cap is not None and cap < MIN_CAP:
        raise InvalidRequest(f"{prefix}max_verbatim_chars", f"must be >= {MIN_CAP} (got {cap})")
    for i, t in enumerate(msg.exclude_tiers):
        if t not in TIERS:
            raise InvalidRequest(f"{prefix}exclude_tiers[{i}]", f"unknown tier {t!r}; tiers are {', '.join(TIERS)}")
    for i, o in enumerate(msg.exclude_owners):
        if not o.strip():
            raise InvalidRequest(f"{prefix}exclude_owners[{i}]", "must not be empty")
    return dict(max_verbatim_chars=cap, exclude_owners=list(msg.exclude_owners), exclude_tiers=list(msg.exclude_tiers),
                require_notices=msg.require_notices)


def complete_request(msg, limits: Limits) -> GenRequest:
    if not msg.prompt:
        raise InvalidRequest("prompt", "must not be empty")
    if len(msg.prompt) > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"{len(msg.prompt)} characters; at most {limits.max_prompt_chars}")
    return generation_request(msg.prompt, msg.params, limits)


def check_messages(messages, limits: Limits | None = None) -> list[dict]:
    """Chat messages as dicts for the chat template; refuses empty lists, unknown roles, empty content and
    (with `limits`) too many messages or characters, before the request takes a queue slot."""
    if len(messages) == 0:
        raise InvalidRequest("messages", "must contain at least one message")
    if limits is not None:
        if len(messages) > limits.max_messages:
            raise InvalidRequest("messages", f"{len(messages)} messages; at most {limits.max_messages}")
        chars = sum(len(m.content) for m in messages)
        if chars > limits.max_prompt_chars:
            raise InvalidRequest("messages", f"{chars} characters in all; at most {limits.max_prompt_chars}")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{i}].role", f"unknown role {m.role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not m.content.strip():
            raise InvalidRequest(f"messages[{i}].content", "must not be empty")
        out.append({"role": m.role, "content": m.content})
    return out


def score_request(msg, limits: Limits) -> ScoreRequest:
    if not msg.text:
        raise InvalidRequest("text", "must not be empty")
    if len(msg.text) > limits.max_score_chars:
        raise InvalidRequest("text", f"longer than {limits.max_score_chars} characters")
    return ScoreRequest(text=msg.text, mode=_mode(msg.mode, "mode", limits), **_knn_overrides(msg, ""))
