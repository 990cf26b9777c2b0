"""silo.v1 wire messages -> the model's request objects (silo.model.request), and the server's limits.

Every rule about what a request may say lives in the request objects themselves; this module only copies
fields across, fills in the server's defaults (max_tokens, mode), renames a refused field to the wire's
spelling (`max_new_tokens` -> `params.max_tokens`) and applies the server's own limits (`Limits.check`:
its token budget, prompt size, stop count, and the modes its store can serve). It all happens before a
request takes a queue slot, so a bad request costs the server nothing; only the prompt's token length is
checked later, on the worker (it needs the tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass

from silo.model.request import ChatMessage, GenerationRequest, OutputControls, RetrievalParams
from silo.model.sampling import SamplingParams
from silo.model.types import SiloInputError

_WIRE = {"max_new_tokens": "max_tokens"}
# a text of more characters than this per allowed token is refused before it is tokenized (no tokenizer of
# a language model spends fewer than 1 token per 16 characters): the worker never tokenizes a megabyte
MAX_CHARS_PER_TOKEN = 16  # the model's field names the wire spells otherwise


class InvalidRequest(SiloInputError):
    """A request field is invalid; `field` is its path in the request message."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}", field, message)

    def __reduce__(self):
        return type(self), (self.field, self.reason)


def _wire_field(field: str | None, prefix: str) -> str:
    """A refused field of the model's request objects as the wire names it."""
    field = field or "request"
    if field.startswith(("prompt", "messages", "text")):
        return field
    head, dot, rest = field.partition("[")
    return prefix + _WIRE.get(head, head) + (dot + rest if dot else "")


@dataclass(frozen=True)
class Limits:
    """What this server allows beyond a request's validity."""

    max_tokens_default: int
    max_tokens_limit: int
    max_stop_sequences: int
    vocab_size: int
    modes: tuple[str, ...] = ("parametric",)  # the modes its model and store can serve now
    max_score_chars: int = 1 << 20  # a cheap bound before tokenizing; tokens are checked on the worker
    max_prompt_chars: int = 32_768  # prompt / all chat messages together (prompt_ids: ids), before queueing
    max_messages: int = 64
    max_logprobs: int = 20  # alternatives per token a request may ask for

    @property
    def default_mode(self) -> str:
        return "knn" if "knn" in self.modes else "parametric"

    def check_mode(self, mode: str, field: str) -> str:
        if mode == "knn" and mode not in self.modes:
            raise InvalidRequest(field, "mode 'knn' needs a datastore and this server has none; use 'parametric'")
        if mode == "ric" and mode not in self.modes:
            raise InvalidRequest(field, "mode 'ric' needs a datastore with RIC-LM blocks and this server's store has "
                                        "none (silo datastore build-blocks); use 'knn' or 'parametric'")
        return mode

    def check(self, req: GenerationRequest, prefix: str = "params.") -> GenerationRequest:
        """`req` if this server takes it (its fields are valid already), else InvalidRequest naming the field."""
        s = req.sampling
        if s.max_new_tokens > self.max_tokens_limit:
            raise InvalidRequest(prefix + "max_tokens", f"must be in [1, {self.max_tokens_limit}] "
                                                        f"(got {s.max_new_tokens})")
        if s.top_k > self.vocab_size:
            raise InvalidRequest(prefix + "top_k", f"must be in [0, {self.vocab_size}]; 0 is off (got {s.top_k})")
        if len(s.stop) > self.max_stop_sequences:
            raise InvalidRequest(prefix + "stop", f"at most {self.max_stop_sequences} sequences (got {len(s.stop)})")
        if req.prompt is not None and len(req.prompt) > self.max_prompt_chars:
            raise InvalidRequest("prompt", f"{len(req.prompt)} characters; at most {self.max_prompt_chars}")
        if req.prompt_ids is not None and len(req.prompt_ids) > self.max_prompt_chars:
            raise InvalidRequest("prompt", f"{len(req.prompt_ids)} token ids; at most {self.max_prompt_chars}")
        if req.output.top_logprobs > self.max_logprobs:
            raise InvalidRequest(prefix + "logprobs", f"must be in [0, {self.max_logprobs}] "
                                                      f"(got {req.output.logprobs})")
        if req.messages is not None:
            if len(req.messages) > self.max_messages:
                raise InvalidRequest("messages", f"{len(req.messages)} messages; at most {self.max_messages}")
            chars = sum(len(m.content) for m in req.messages)
            if chars > self.max_prompt_chars:
                raise InvalidRequest("messages", f"{chars} characters in all; at most {self.max_prompt_chars}")
        self.check_mode(req.retrieval.mode, prefix + "mode")
        return req


@dataclass(frozen=True)
class ScoreRequest:
    text: str
    retrieval: RetrievalParams

    @property
    def mode(self) -> str:
        return self.retrieval.mode


def _opt(msg, name):
    return getattr(msg, name) if msg.HasField(name) else None


def _retrieval(msg, limits: Limits) -> RetrievalParams:
    return RetrievalParams(mode=msg.mode or limits.default_mode, k=_opt(msg, "k"), lmbda=_opt(msg, "lmbda"),
                           tau=_opt(msg, "tau"), ric_retriever=getattr(msg, "ric_retriever", "") or None,
                           ric_blocks=_opt(msg, "ric_blocks") if hasattr(msg, "ric_blocks") else None)


def _request(params, limits: Limits, **prompt) -> GenerationRequest:
    """A GenerationRequest from a GenerationParams message and the prompt (or messages)."""
    max_tokens = _opt(params, "max_tokens")
    temperature, top_p = _opt(params, "temperature"), _opt(params, "top_p")
    try:
        return GenerationRequest(
            **prompt,
            sampling=SamplingParams(max_new_tokens=limits.max_tokens_default if max_tokens is None else max_tokens,
                                    temperature=1.0 if temperature is None else temperature,
                                    top_p=1.0 if top_p is None else top_p, top_k=_opt(params, "top_k") or 0,
                                    stop=tuple(params.stop), seed=_opt(params, "seed")),
            retrieval=_retrieval(params, limits),
            output=OutputControls(attributions=params.return_attributions,
                                  max_verbatim_chars=_opt(params, "max_verbatim_chars"),
                                  exclude_owners=tuple(params.exclude_owners),
                                  exclude_tiers=tuple(params.exclude_tiers), require_notices=params.require_notices,
                                  logprobs=_opt(params, "logprobs"), echo=params.echo))
    except SiloInputError as exc:
        raise exc.renamed(_wire_field(exc.field, "params.")) from None


def complete_request(msg, limits: Limits) -> GenerationRequest:
    """A silo.v1 CompleteRequest as a checked GenerationRequest (its prompt as text or as token ids)."""
    if msg.prompt_ids and msg.prompt:
        raise InvalidRequest("prompt", "give prompt or prompt_ids, not both")
    if len(msg.prompt_ids) > limits.max_prompt_chars:  # before copying an unbounded list of ids
        raise InvalidRequest("prompt_ids", f"{len(msg.prompt_ids)} token ids; at most {limits.max_prompt_chars}")
    prompt = {"prompt_ids": tuple(msg.prompt_ids)} if msg.prompt_ids else {"prompt": msg.prompt}
    return limits.check(_request(msg.params, limits, **prompt))


def chat_request(msg, limits: Limits) -> GenerationRequest:
    """A silo.v1 ChatRequest as a checked GenerationRequest (the chat template is applied on the worker)."""
    if len(msg.messages) > limits.max_messages:  # before copying an unbounded list of messages
        raise InvalidRequest("messages", f"{len(msg.messages)} messages; at most {limits.max_messages}")
    messages = tuple(ChatMessage(m.role, m.content) for m in msg.messages)
    return limits.check(_request(msg.params, limits, messages=messages))


def score_request(msg, limits: Limits) -> ScoreRequest:
    if not msg.text:
        raise InvalidRequest("text", "must not be empty")
    if len(msg.text) > limits.max_score_chars:
        raise InvalidRequest("text", f"{len(msg.text)} characters; at most {limits.max_score_chars} (Score reads at "
                                     "most serve.max_score_tokens tokens)")
    try:
        retrieval = _retrieval(msg, limits)
    except SiloInputError as exc:
        raise exc.renamed(_wire_field(exc.field, "")) from None
    limits.check_mode(retrieval.mode, "mode")
    return ScoreRequest(text=msg.text, retrieval=retrieval)
