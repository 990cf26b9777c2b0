"""Log-probabilities in OpenAI's shapes, from the model's `TokenLogprob`s (one per token, prompt or completion).

Completions (`choice.logprobs`, and per chunk when streaming):

    {"tokens": [" God", " said"], "token_logprobs": [-3.1, -0.4], "top_logprobs": [{" God": -3.1, ...}, ...],
     "text_offset": [3, 7]}

`top_logprobs[i]` holds the `logprobs` most probable tokens there and, as OpenAI's API does, the token itself
(so up to logprobs + 1 entries); keys are the tokens' texts (where two alternatives read the same, the more
probable one is kept). The first token of a prompt given as ids has neither (nothing came before it): null.

Chat (`choice.logprobs`): {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}], "refusal": null}, exactly `top_logprobs` alternatives per token.

SILO's own per-token fields ride in the choice's `silo` extension, aligned with the tokens above:
`{"token_ids": [...], "lmbda": [...], "logprob_parametric": [...]}` (lambda: the kNN weight at that
position, 0 outside kNN-LM).
"""

from __future__ import annotations

import math
from typing import Sequence

from silo.model.types import TokenLogprob


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf (a kNN mass of 0 with lambda 1)


def completion_logprobs(tokens: Sequence[TokenLogprob], shift: int = 0) -> dict:
    """OpenAI completions' logprobs object; `shift` is added to every text offset (an echoed prompt's
    length, for the completion's tokens)."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [_num(t.logprob) for t in tokens],
            "top_logprobs": [_top_dict(t) for t in tokens], "text_offset": [t.offset + shift for t in tokens]}


def _top_dict(t: TokenLogprob) -> dict | None:
    if t.logprob is None:
        return None
    out: dict[str, float] = {}
    for _, text, value in t.top:
        out.setdefault(text, _num(value))
    out.setdefault(t.text, _num(t.logprob))
    return out


def joined(parts: Sequence[dict]) -> dict | None:
    """Completions' logprobs objects of consecutive pieces (echoed prompt, then completion) as one."""
    if not parts:
        return None
    return {key: [x for part in parts for x in part[key]] for key in parts[0]}


def chat_logprobs(tokens: Sequence[TokenLogprob], top: int) -> dict:
    """OpenAI chat's logprobs object: `top` alternatives per token."""
    return {"content": [{"token": t.text, "logprob": _num(t.logprob), "bytes": list(t.text.encode()),
                         "top_logprobs": [{"token": x, "logprob": _num(v), "bytes": list(x.encode())}
                                          for _, x, v in t.top[:top]]}
                        for t in tokens], "refusal": None}


def silo_token_fields(tokens: Sequence[TokenLogprob]) -> dict:
    """The per-token fields of the `silo` extension, aligned with the logprobs' tokens."""
    return {"token_ids": [t.token for t in tokens], "lmbda": [t.lmbda for t in tokens],
            "logprob_parametric": [_num(t.logprob_parametric) for t in tokens]}
