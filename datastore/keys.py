"""kNN-LM keys from any Hugging Face causal LM.

The key of a position is the input of the model's output layer at that position (the final hidden state,
after the last layer norm); its value is the next token. We capture it with a forward pre-hook on
``model.get_output_embeddings()``, which every HF causal LM (GPT-2, GPT-NeoX, Llama, ...) exposes, so no
per-architecture code is needed.

Building a store needs keys but not logits. When the decoder (``model.get_decoder()``) returns exactly
what the output layer receives (checked once per model on a probe input), the builder runs only the
decoder and skips the vocabulary projection, which is a large share of a small model's compute.

Long documents are read in sliding windows: window w covers tokens [begin, end) and contributes the keys
of the positions it sees first, so every position is computed exactly once, with at least
``window - stride`` tokens of context after the first window (the SILO evaluation protocol, applied to
building as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch


class OutputInputCapture:
    """Context manager that records the input of the model's output layer on every forward."""

    def __init__(self, model: torch.nn.Module):
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings; kNN-LM needs a causal LM head")
        self.head = head
        self.value: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, kwargs=None):
        self.value = args[0] if args else (kwargs or {}).get("input")

    def __enter__(self) -> "OutputInputCapture":
        self._handle = self.head.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None


def window_plan(n_positions: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over positions [0, n): (begin, end, first_new) where positions [first_new, end) are new.

    The first window contributes all its positions; each later window starts `stride` after the previous
    one and contributes the positions past the previous window's end.
    """
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(f"need 0 < stride <= window (got window={window}, stride={stride})")
    plan: list[tuple[int, int, int]] = []
    prev_end = 0
    begin = 0
    while prev_end < n_positions:
        end = min(begin + window, n_positions)
        plan.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    return plan


def decoder_matches_head_input(model: torch.nn.Module) -> bool:
    """True if ``model.get_decoder()(ids).last_hidden_state`` is what the output layer receives."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return False
    if decoder is None or decoder is model:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device).unsqueeze(0) % max(2, model.config.vocab_size)
    with torch.inference_mode(), OutputInputCapture(model) as cap:
        model(input_ids=ids)
        want = cap.value
        try:
            got = decoder(input_ids=ids).last_hidden_state
        except Exception:  # a decoder with another calling convention: use the hook path
            return False
    return want is not None and got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=1e-4)


@dataclass
class DocumentKeys:
    doc_index: int
    keys: np.ndarray  # [n, d] float32
    next_tokens: np.ndarray  # [n] int32: the value of each key
    positions: np.ndarray  # [n] int32: index of the next token in the document's token list
    char_offsets: np.ndarray  # [n] int32: character offset of the next token in the document text


def encode_document(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character offset where each token starts."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]


class KeyExtractor:
    """Batched, inference-mode key extraction over documents in sliding windows."""

    def __init__(self, model: torch.nn.Module, tokenizer, window: int, stride: int, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.window = window
        self.stride = stride
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.bos_id = tokenizer.eos_token_id
        self.fast = decoder_matches_head_input(model)

    @torch.inference_mode()
    def hidden(self, batch_ids: list[list[int]]) -> torch.Tensor:
        """Output-layer inputs for a batch of token lists, right-padded to the window: [B, window, d] float32.

        Always the window's length, never the batch's longest list: the arithmetic then has the same shape
        whatever else is in the batch, so a position's key is a function of its document alone (bit for
        bit on the CPU: padding to the batch's longest list moved keys by up to 1e-6). A store rebuilt
        without some documents then holds exactly the keys the others had (datastore/equivalence.py)."""
        T = max(self.window, max(len(x) for x in batch_ids))
        ids = torch.full((len(batch_ids), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), T), dtype=torch.long)
        for i, x in enumerate(batch_ids):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if self.fast:
            return self.model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        with OutputInputCapture(self.model) as cap:
            self.model(input_ids=ids, attention_mask=mask)
        return cap.value.float()

    def iter_documents(self, texts: Sequence[str]) -> Iterator[DocumentKeys]:
        """Yield the keys of each document in order (documents with no tokens yield empty arrays)."""
        pending: list[tuple[int, int, int, int]] = []  # (doc, begin, end, first_new)
        encoded: dict[int, tuple[list[int], list[int]]] = {}
        parts: dict[int, list[tuple[np.ndarray, int]]] = {}
        remaining: dict[int, int] = {}
        next_to_emit = 0

        def flush():
            nonlocal pending
            if not pending:
                return
            seqs = [encoded[d][0][b:e] for d, b, e, _ in pending]
            h = self.hidden(seqs).cpu().numpy()
            for row, (d, b, e, first_new) in enumerate(pending):
                parts[d].append((h[row, first_new - b: e - b], first_new))
                remaining[d] -= 1
            pending = []

        def emit_ready():
            nonlocal next_to_emit
            while next_to_emit in remaining and remaining[next_to_emit] == 0:
                d = next_to_emit
                ids, offs = encoded.pop(d)
                chunks = parts.pop(d)
                del remaining[d]
                n = len(ids) - 1  # positions 0..n-1 each predict ids[p + 1]
                keys = np.concatenate([c for c, _ in chunks])[:n] if chunks else np.zeros((0, 0), np.float32)
                pos = np.arange(1, n + 1, dtype=np.int32)
                yield DocumentKeys(
                    doc_index=d,
                    keys=np.ascontiguousarray(keys, dtype=np.float32),
                    next_tokens=np.asarray(ids[1: n + 1], dtype=np.int32),
                    positions=pos - 1,
                    char_offsets=np.asarray([offs[p - 1] for p in pos], dtype=np.int32),
                )
                next_to_emit += 1

        for d, text in enumerate(texts):
            ids, offs = encode_document(self.tokenizer, text)
            ids = [self.bos_id] + ids  # position 0 (BOS) predicts the first real token
            encoded[d] = (ids, offs)
            parts[d] = []
            # Only positions 0..len-2 have a next token; the window must still include them as input.
            plan = window_plan(len(ids) - 1, self.window, self.stride) if len(ids) > 1 else []
            remaining[d] = len(plan)
            for b, e, first_new in plan:
                pending.append((d, b, e, first_new))
                if len(pending) >= self.batch_size:
                    flush()
                    yield from emit_ready()
            yield from emit_ready()
        flush()
        yield from emit_ready()
