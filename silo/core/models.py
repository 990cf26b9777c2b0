"""Loading a causal LM and its tokenizer, and the device it runs on.

Models are Hugging Face folders or hub ids loaded with `from_pretrained` (offline in practice: the CLI
sets HF_HUB_OFFLINE=1, so a missing local folder fails instead of downloading).
"""

from __future__ import annotations

# Chat rendering for tokenizers that ship no template: role tags on their own line, EOS after each turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names the path."""


DEVICE_HELP = "auto (cuda when a GPU is visible, else cpu) | cpu | cuda | cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(spec: str | None = "auto", field: str = "device") -> str:
    """The torch device a setting names: auto | cpu | cuda | cuda:N (refused with the field named when the
    machine has no such GPU)."""
    import torch

    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu" or spec.startswith("cpu:"):  # (accelerate names its CPU processes' device cpu:N)
        return "cpu"
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"{field}: {spec!r} asks for a GPU but torch sees none here; use auto or cpu")
        if ":" in spec and int(spec[5:]) >= torch.cuda.device_count():
            raise ModelLoadError(f"{field}: {spec!r} but this machine has {torch.cuda.device_count()} GPU(s)")
        return spec
    raise ModelLoadError(f"{field}: {spec!r} is not a device; expected {DEVICE_HELP}")


def resolve_dtype(spec: str | None, device: str):
    """float32 on CPU; on a GPU `auto` is bfloat16 where supported, else float16."""
    import torch

    spec = spec or "auto"
    if spec not in DTYPES:
        raise ModelLoadError(f"dtype: {spec!r}; expected one of {', '.join(DTYPES)}")
    if spec == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, spec)


def load_lm(name_or_path: str, device: str = "cpu", dtype: str | None = "auto"):
    """Load a HF causal LM and its tokenizer (a hub id or a local folder), in eval mode on `device` (any
    of `resolve_device`'s settings) in `dtype`. The model's fingerprint is taken from the weights as
    stored, before any cast, so a store built in float32 opens for the same model served in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fingerprint import model_fingerprint

    device = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch_dtype = resolve_dtype(dtype, device)
    if torch_dtype != next(model.parameters()).dtype:
        model.silo_fingerprint = model_fingerprint(model, tokenizer)
        model = model.to(dtype=torch_dtype)
    return model.to(device).eval(), tokenizer


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or SILO's default for tokenizers that ship none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
