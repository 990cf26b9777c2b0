"""Model fingerprint: one hash of config, weights and tokenizer.

A datastore's keys are only meaningful for the exact model that produced them, so a store records the
fingerprint of its model and refuses to attach to any other. The hash covers the architecture config
(minus fields that do not change the function, such as the library version), every parameter and
buffer tensor by name, and the tokenizer's serialised vocabulary and merges.
"""

from __future__ import annotations

import hashlib
import json

import torch

_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "use_cache"}


def model_fingerprint(model: torch.nn.Module, tokenizer) -> str:
    if getattr(model, "silo_fingerprint", None):  # taken before the weights were cast (silo.core.models.load_lm)
        return model.silo_fingerprint
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_repr = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    h.update(tok_repr.encode())
    return "sha256:" + h.hexdigest()
