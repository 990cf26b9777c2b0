"""Train a causal LM on permissively licensed text only, with a provenance record.

corpus -> licence policy + exact de-duplication -> byte-level BPE tokenizer -> packed token stream ->
Hugging Face causal LM (GPT-NeoX or Llama family, sizes from the config) trained with `accelerate`
(the same script runs on this CPU and on several GPUs under ``accelerate launch``) -> a model folder
that ``AutoModelForCausalLM.from_pretrained`` loads, plus ``provenance.json``.

The loop follows nanoGPT: random windows of the packed stream, AdamW, linear warm-up then cosine decay,
periodic held-out loss, and checkpoints that resume bit-for-bit (the batch for step s is drawn from a
generator seeded by (seed, s), so resuming needs no data-loader state).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from silo.core.config import StageConfig
from silo.core.corpus import Document, load_documents
from silo.core.files import swap_dir_atomic
from silo.core.fingerprint import model_fingerprint
from silo.core.licenses import POLICIES, TIERS, check_tiers

from .index import write_training_index, split_stream
from .policy import PolicyReport, apply_policy
from .tokenizer import save_tokenizer, train_tokenizer


class ModelSpec(StageConfig):
    family: Literal["gpt_neox", "llama"] = "gpt_neox"
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    intermediate_size: int = Field(1024, gt=0)
    context_length: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class TokenizerSpec(StageConfig):
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    path: str | None = None  # reuse an existing tokenizer (folder or hub id) instead of training one


class TrainConfig(StageConfig):
    corpus: list[str] = Field(min_length=1)
    eval_corpus: list[str] = []
    domains: list[str] | None = None  # keep only these domains of the corpus (None: all)
    policy: Literal["pd", "pdsw", "pdswby", "custom"] = "pdsw"
    allowed_tiers: list[str] | None = None  # required when policy is custom
    drop_disallowed: bool = False
    output_dir: str
    checkpoint_dir: str | None = None  # default: <output_dir>-checkpoints
    init_from: str | None = None  # hub id or folder: continue from these weights (and tokenizer)
    tokenizer: TokenizerSpec = TokenizerSpec()
    model: ModelSpec = ModelSpec()
    seq_len: int = Field(256, gt=1)
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int = Field(300, gt=0)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, gt=0)
    eval_tokens: int = Field(32768, gt=0)
    save_every: int = Field(100, gt=0)
    seed: int = 0
    threads: int | None = Field(None, gt=0)
    # write the training-data index (training/index.py) beside the weights: tracing and the guard over
    # training text need it
    training_index: bool = True

    @field_validator("allowed_tiers")
    @classmethod
    def _tiers_known(cls, v):
        if v is not None:
            bad = [t for t in v if t not in TIERS]
            if bad:
                raise ValueError(f"unknown tier(s) {bad}; tiers are {', '.join(TIERS)}")
        return v

    @model_validator(mode="after")
    def _policy_consistent(self):
        if self.policy == "custom" and not self.allowed_tiers:
            raise ValueError("policy 'custom' needs allowed_tiers")
        if self.seq_len > self.model.context_length and self.init_from is None:
            raise ValueError(f"seq_len ({self.seq_len}) exceeds model.context_length ({self.model.context_length})")
        return self

    def tiers(self) -> tuple[str, ...]:
        if self.policy == "custom":
            return check_tiers(tuple(self.allowed_tiers or ()))
        if self.allowed_tiers is not None and tuple(self.allowed_tiers) != POLICIES[self.policy]:
            raise ValueError(
                f"policy '{self.policy}' means tiers {POLICIES[self.policy]} but allowed_tiers says "
                f"{tuple(self.allowed_tiers)}; use policy: custom for another set"
            )
        return POLICIES[self.policy]


def build_model(spec: ModelSpec, vocab_size: int, eos_id: int, pad_id: int):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, LlamaConfig

    if spec.family == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
            max_position_embeddings=spec.context_length, rotary_pct=0.25, use_parallel_residual=True,
            tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
    else:
        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size, max_position_embeddings=spec.context_length,
            tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )
    return AutoModelForCausalLM.from_config(cfg)


def encode_stream(docs: list[Document], tokenizer, desc: str) -> tuple[np.ndarray, list[int]]:
    """Tokenise documents into one packed stream, EOS after each; returns (stream, tokens per doc)."""
    eos = tokenizer.eos_token_id
    counts: list[int] = []
    parts: list[np.ndarray] = []
    batch = 64
    for i in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False, disable=None):
        enc = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False)["input_ids"]
        for ids in enc:
            counts.append(len(ids))
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream, counts


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def sample_batch(stream: np.ndarray, seq_len: int, batch_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    g = np.random.default_rng([seed, step, rank])
    starts = g.integers(0, len(stream) - seq_len, size=batch_size)
    return torch.from_numpy(np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int64))


@torch.inference_mode()
def heldout_loss(model, stream: np.ndarray, seq_len: int, batch_size: int, device) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the held-out stream."""
    n = (len(stream) - 1) // seq_len
    if n == 0:
        return float("nan")
    windows = torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i:i + batch_size].to(device)
        out = model(input_ids=x, labels=x)
        total += out.loss.item() * x.numel()
        count += x.numel()
    if was_training:
        model.train()
    return total / count


def train(cfg: TrainConfig, config_source: str = "", progress: bool = True) -> dict:
    """Run the whole training stage; returns the provenance record written next to the model."""
    from accelerate import Accelerator

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tiers = cfg.tiers()
    out_dir = Path(cfg.output_dir)
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else out_dir.with_name(out_dir.name + "-checkpoints")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    say = accelerator.print if progress else (lambda *a, **k: None)

    report = _training_documents(cfg, tiers, say)
    kept = report.kept
    eval_docs = [d for d in load_documents(cfg.eval_corpus, cfg.domains)] if cfg.eval_corpus else []

    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone
    tokenizer, model = _tokenizer_and_model(cfg, kept, say)
    stream, doc_tokens = encode_stream(kept, tokenizer, "tokenising training text")
    eval_stream, _ = encode_stream(eval_docs, tokenizer, "tokenising held-out text")
    eval_stream = eval_stream[: cfg.eval_tokens + 1]
    if len(stream) <= cfg.seq_len + 1:
        raise ValueError(f"train.corpus: only {len(stream)} tokens after the policy, fewer than seq_len {cfg.seq_len}")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"model: {cfg.model.family if not cfg.init_from else cfg.init_from}, {n_params / 1e6:.2f}M parameters; "
        f"training stream {len(stream):,} tokens from {len(kept)} documents")

    model, optimizer = accelerator.prepare(model, _optimizer(model, cfg))
    run = _train_steps(cfg, accelerator, model, optimizer, stream, eval_stream, ckpt_dir, say, progress)

    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    model = accelerator.unwrap_model(model)
    model.eval()
    tmp_dir = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    model.save_pretrained(str(tmp_dir))
    save_tokenizer(tokenizer, tmp_dir)
    provenance = {
        "format": "silo.provenance.v1",
        "fingerprint": model_fingerprint(model, tokenizer),
        "policy": {"name": cfg.policy, "allowed_tiers": list(tiers)},
        "summary": {
            **report.summary(),
            "training_tokens_in_stream": int(len(stream)),
            "tokens_trained_on": int(run.trained_tokens + run.start_step * run.tokens_per_step),
            "parameters": int(n_params),
            "train_seconds_this_run": round(run.seconds, 2),
            "tokens_per_second": round(run.trained_tokens / max(run.seconds, 1e-9), 1),
        },
        "documents": [
            {"id": d.id, "owner": d.owner, "license": d.license, "tier": d.tier, "source": d.source,
             "sha256": d.sha256, "tokens": n}
            for d, n in zip(kept, doc_tokens)
        ],
        "refused_documents": [{"id": d.id, "license": d.license, "tier": d.tier} for d in report.refused],
        "duplicates_removed": [{"id": a, "duplicate_of": b} for a, b in report.duplicates],
        "history": run.history,
        "config": json.loads(cfg.model_dump_json()),
        "config_source": config_source,
    }
    (tmp_dir / "provenance.json").write_text(json.dumps(provenance, indent=1))
    if cfg.training_index:
        info = write_training_index(tmp_dir, kept, split_stream(stream, doc_tokens), provenance["fingerprint"],
                                    tokenizer.eos_token_id, int(model.config.vocab_size))
        say(f"training-data index: {info['tokens']:,} tokens of {info['documents']} documents, "
            f"{info['bytes'] / max(info['tokens'], 1):.1f} bytes/token")
    swap_dir_atomic(tmp_dir, out_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)  # the finished model supersedes the resumable state
    return provenance


def index_trained_model(cfg: TrainConfig, model_dir: str | None = None, progress: bool = True) -> dict:
    """Write the training-data index of a model trained before `silo train` wrote one: the config's corpus
    through the same policy and de-duplication, refused unless the documents (ids and sha256, in order) are
    those of the model's provenance record. Returns index.json's content."""
    from transformers import AutoConfig, AutoTokenizer

    say = print if progress else (lambda *a, **k: None)
    model_dir = Path(model_dir or cfg.output_dir)
    prov_path = model_dir / "provenance.json"
    if not prov_path.exists():
        raise ValueError(f"{prov_path}: missing; the training-data index is tied to the provenance record")
    prov = json.loads(prov_path.read_text(encoding="utf-8"))
    kept = _training_documents(cfg, cfg.tiers(), say).kept
    want = [(d["id"], d["sha256"]) for d in prov["documents"]]
    got = [(d.id, d.sha256) for d in kept]
    if got != want:
        differ = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ValueError(f"train.corpus: the documents differ from {prov_path} (first at position {differ}: "
                         f"{got[differ][0] if differ < len(got) else 'none'} vs "
                         f"{want[differ][0] if differ < len(want) else 'none'}); index the corpus the model was "
                         "trained on")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = int(AutoConfig.from_pretrained(str(model_dir)).vocab_size)
    stream, counts = encode_stream(kept, tokenizer, "tokenising training text")
    return write_training_index(model_dir, kept, split_stream(stream, counts), prov["fingerprint"],
                                tokenizer.eos_token_id, vocab)


def _training_documents(cfg: TrainConfig, tiers: tuple[str, ...], say) -> PolicyReport:
    """The corpus through the licence policy and exact de-duplication (what was dropped is said)."""
    docs = load_documents(cfg.corpus, cfg.domains)
    if not docs:
        raise ValueError(f"train.corpus: no documents found in {cfg.corpus} (domains {cfg.domains})")
    report = apply_policy(docs, tiers, cfg.drop_disallowed)
    if report.refused:
        say(f"dropped {len(report.refused)} document(s) outside the policy (tiers {', '.join(tiers)})")
    if report.duplicates:
        say(f"removed {len(report.duplicates)} exact duplicate document(s)")
    return report


def _tokenizer_and_model(cfg: TrainConfig, kept: list[Document], say):
    """(tokenizer, model): both from `init_from`, a given tokenizer and a new model, or a tokenizer trained
    on the kept documents and a new model (its weights drawn from torch's generator, seeded by the caller)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.init_from:
        tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from)
    elif cfg.tokenizer.path:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer.path)
        model = build_model(cfg.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer((d.text for d in kept), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        say(f"trained a {len(tokenizer)}-token byte-level BPE on {len(kept)} documents in {time.time() - t0:.1f}s")
        model = build_model(cfg.model, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on biases and norms)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


@dataclass
class _Run:
    """The training loop's account: the step it started from (after a resume), the tokens of one step,
    the held-out records it logged, the tokens it trained on and its seconds."""

    start_step: int
    tokens_per_step: int
    history: list[dict] = field(default_factory=list)
    trained_tokens: int = 0
    seconds: float = 0.0


def _train_steps(cfg: TrainConfig, accelerator, model, optimizer, stream: np.ndarray, eval_stream: np.ndarray,
                 ckpt_dir: Path, say, progress: bool) -> _Run:
    """Steps from the last checkpoint made with this config (or 0) to max_steps: held-out loss every
    eval_every steps and at the end, a checkpoint every save_every steps."""
    config_json = cfg.model_dump_json()
    start_step = _resume(accelerator, ckpt_dir, config_json, say)
    model.train()
    run = _Run(start_step, cfg.batch_size * cfg.grad_accum * cfg.seq_len * accelerator.num_processes)
    t_start = time.time()
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step",
               disable=not (progress and accelerator.is_local_main_process) or None)
    for step in range(start_step, cfg.max_steps):
        loss_val = _step(cfg, accelerator, model, optimizer, stream, step)
        run.trained_tokens += run.tokens_per_step
        elapsed = time.time() - t_start
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{run.trained_tokens / max(elapsed, 1e-9):,.0f}")
        bar.update(1)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            run.history.append(_evaluate(cfg, accelerator, model, eval_stream, step, loss_val, say))
        if done % cfg.save_every == 0 and done < cfg.max_steps:
            _checkpoint(accelerator, ckpt_dir, done, config_json)
    bar.close()
    run.seconds = time.time() - t_start
    return run


def _resume(accelerator, ckpt_dir: Path, config_json: str, say) -> int:
    """The step to start from: that of a checkpoint made with the same config (its state loaded), else 0."""
    state_file = ckpt_dir / "trainer_state.json"
    if not state_file.exists():
        return 0
    state = json.loads(state_file.read_text())
    if state.get("config") != config_json:
        say(f"ignoring checkpoint in {ckpt_dir}: it was made with a different config")
        return 0
    accelerator.load_state(str(ckpt_dir / "state"))
    say(f"resuming from step {state['step']} ({ckpt_dir})")
    return state["step"]


def _step(cfg: TrainConfig, accelerator, model, optimizer, stream: np.ndarray, step: int) -> float:
    """One optimiser step (grad_accum micro-batches, each drawn from the generator seeded by (seed, micro
    step, rank)); returns the last micro-batch's loss."""
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, cfg)
    for micro in range(cfg.grad_accum):
        x = sample_batch(stream, cfg.seq_len, cfg.batch_size, cfg.seed,
                         step * cfg.grad_accum + micro, accelerator.process_index).to(accelerator.device)
        with accelerator.accumulate(model):
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _evaluate(cfg: TrainConfig, accelerator, model, eval_stream: np.ndarray, step: int, loss_val: float,
              say) -> dict:
    """The history record after `step`: train loss, learning rate and (with held-out text) held-out loss."""
    done = step + 1
    rec = {"step": done, "train_loss": loss_val, "lr": lr_at(step, cfg)}
    if len(eval_stream) > cfg.seq_len:
        rec["heldout_loss"] = heldout_loss(accelerator.unwrap_model(model), eval_stream, cfg.seq_len,
                                           cfg.batch_size, accelerator.device)
        say(f"\nstep {done}: train loss {loss_val:.3f}, held-out loss {rec['heldout_loss']:.3f} "
            f"(ppl {math.exp(rec['heldout_loss']):.1f})")
    return rec


def _checkpoint(accelerator, ckpt_dir: Path, done: int, config_json: str) -> None:
    """Save the resumable state after `done` steps (trainer_state.json replaced last, atomically)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(ckpt_dir / "state"))
    state_file = ckpt_dir / "trainer_state.json"
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": done, "config": config_json}))
    os.replace(tmp, state_file)
