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


def load_lm(name_or_path: str, device: str = "cpu"):
    """Load a HF causal LM and its tokenizer (a hub id or a local folder), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot load model '{name_or_path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or SILO's default for tokenizers that ship none."""
    return getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
