"""RIC-LM: retrieval in context. The datastore's text blocks (datastore/blocks.py) are retrieved with the
text before the scored window and prepended to the model's input (In-Context RALM; SILO's RIC-LM).

Scoring protocol: texts are read in sliding windows of `window` tokens with `stride` (default: the model
context minus one block, and half of that), so that block + window fit the context. The query of a
window is its unscored prefix (the `window - stride` tokens before the scored ones); the first window of a
text has no prefix and is scored without a block. The top block(s) are prepended, separated by a blank
line, and truncated from the LEFT so that block + window fit the context (the end of a block is what
leads into the text). With `continuation` (default) a block is extended by the next block of its document,
as RETRO does: the block that best matches the query usually ends where the query ends, and the text
after it is what can predict the scored tokens. `ensemble=True` instead runs one forward per block and averages the next-token
distributions (REPLUG, uniform weights). Every position is also scored without a block on the same
windows (`logp_lm`), the fair parametric baseline for this protocol.

Blocks are stored as text and re-encoded with the scoring LM's tokenizer, so one block store serves any
LM (the weights of a PD or PDSWBY variant, the reference) and the left truncation absorbs any difference
in block length between tokenizers.

Attribution: a text generated in RIC mode is credited to the prepended blocks' documents (owner, id,
title, licence; the block is the supporting passage), split by retrieval rank; the parametric share is 0
whenever a block was used, 1 otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from silo.core.config import StageConfig
from silo.datastore.blocks import BlockHit, BlockStore
from silo.datastore.keys import window_plan

from .attribution import attribute_blocks, rank_shares
from .protocols import SequenceRetrieval
from .types import GenerationStep, ScoreResult, SentenceAttribution, SiloInputError, TopTokens


class RICConfig(StageConfig):
    retriever: Literal["bm25", "dense"] = "bm25"
    n_blocks: int = Field(1, ge=1)  # blocks prepended (concatenated) or ensembled
    ensemble: bool = False  # REPLUG-style: average next-token distributions over the n blocks (scoring only)
    window: int | None = Field(None, gt=1)  # scored windows; default: context - block_tokens
    stride: int | None = Field(None, gt=0)  # default: window // 2
    query_tokens: int | None = Field(None, gt=0)  # cap on the query (last tokens of the prefix)
    separator: str = "\n\n"
    continuation: bool = True  # prepend block + the document's next block (RETRO), left-truncated to fit
    dense_model: str | None = None  # sentence-transformers folder; default: what the blocks were built with


@dataclass
class RICBatch:
    """Per scored position: target, log-prob with block(s) and without, text index, whether a block was used."""

    targets: np.ndarray
    logp: np.ndarray
    logp_lm: np.ndarray
    text_index: np.ndarray
    used_block: np.ndarray
    hits: list[list[BlockHit]]  # per window
    top: TopTokens | None = None  # the most probable tokens at each position, with the block (when asked)

    def truncate(self, n: int) -> "RICBatch":
        return RICBatch(self.targets[:n], self.logp[:n], self.logp_lm[:n], self.text_index[:n],
                        self.used_block[:n], self.hits, self.top.rows(slice(0, n)) if self.top is not None else None)


def as_ric_config(ric: RICConfig | dict | None, **over) -> RICConfig:
    base = ric if isinstance(ric, RICConfig) else None
    data = {**(base.model_dump() if base else dict(ric or {})), **{k: v for k, v in over.items() if v is not None}}
    try:
        return RICConfig.model_validate(data)
    except Exception as exc:
        raise SiloInputError(f"invalid RIC setting: {exc}") from None


def ric_plan(lm, cfg: RICConfig, blocks: BlockStore) -> tuple[int, int]:
    ctx = lm.context_length
    window = cfg.window or max(2, ctx - blocks.block_tokens)
    if window >= ctx:
        raise SiloInputError(f"ric.window ({window}) leaves no room for a block in the model's context ({ctx} "
                             "tokens); set ric.window below the context length")
    stride = cfg.stride or max(1, window // 2)
    if stride > window:
        raise SiloInputError(f"ric.stride ({stride}) must not exceed ric.window ({window})")
    return window, stride


def retrieve_windows(lm, texts: Sequence[str] | Sequence[Sequence[int]], cfg: RICConfig, blocks: BlockStore, n: int,
                     max_positions: int | None = None):
    """Window jobs (text, begin, end, first_new), token ids per text, and top-n hits per job. A text may be
    given as token ids (read from its first id, as `SiloLM.score_ids` reads them)."""
    window, stride = ric_plan(lm, cfg, blocks)
    jobs, per_ids, queries = [], [], []
    scored = 0
    for ti, text in enumerate(texts):
        ids = lm.text_ids(text) if isinstance(text, str) else list(text)
        per_ids.append(ids)
        for b, e, f in window_plan(len(ids) - 1, window, stride) if len(ids) > 1 else []:
            if max_positions is not None and scored >= max_positions:
                break
            q = ids[max(b, 1): f + 1]  # the unscored prefix of the window (never the scored tokens)
            if cfg.query_tokens:
                q = q[-cfg.query_tokens:]
            jobs.append((ti, b, e, f))
            queries.append(lm.tokenizer.decode(q) if q else "")
            scored += e - f
    hits = blocks.search(queries, n, cfg.retriever) if jobs else []
    return jobs, per_ids, hits


@torch.inference_mode()
def score_windows(lm, cfg: RICConfig, jobs, per_ids, hits, n_blocks: int, ensemble: bool,
                  blocks: BlockStore | None = None, top: int = 0) -> RICBatch:
    """Score each window without a block and with its top `n_blocks` hits (concatenated or ensembled);
    `top` > 0 also keeps the most probable tokens at each position (with the block; concatenated only)."""
    if not jobs:
        z = np.zeros(0)
        return RICBatch(z.astype(np.int64), z, z, z.astype(np.int32), z.astype(bool), [])
    seqs = _window_sequences(lm, cfg, jobs, hits, n_blocks, ensemble, blocks)
    top = 0 if ensemble else top
    lp, best_of = _score_sequences(lm, seqs, jobs, per_ids, top)
    targets, logp, logp_lm, owner, used, tops = [], [], [], [], [], []
    for j, (ti, b, e, f) in enumerate(jobs):
        base = lp[(j, -1)]
        variants = [lp[k] for k in ((j, v) for v in range(n_blocks)) if k in lp]
        if top:
            tops.append(best_of[(j, 0) if (j, 0) in best_of else (j, -1)])
        # REPLUG: log mean_j p_j(y); for the concatenated case there is one variant
        logp.append(np.logaddexp.reduce(np.stack(variants), axis=0) - math.log(len(variants)) if variants else base)
        targets.append(np.asarray(per_ids[ti][f + 1:e + 1], dtype=np.int64))
        logp_lm.append(base)
        owner.append(np.full(e - f, ti, dtype=np.int32))
        used.append(np.full(e - f, bool(variants)))
    return RICBatch(np.concatenate(targets), np.concatenate(logp), np.concatenate(logp_lm),
                    np.concatenate(owner), np.concatenate(used), [h[:n_blocks] for h in hits],
                    TopTokens.concat(tops) if top else None)


def _window_sequences(lm, cfg: RICConfig, jobs, hits, n_blocks: int, ensemble: bool,
                      blocks: BlockStore | None) -> list[tuple[int, int, list[int]]]:
    """(job index, variant, prefix ids) of every sequence to score: each window alone (variant -1), and
    with its blocks prepended (one variant, or one per block when ensembling)."""
    ctx = lm.context_length
    sep = lm.encode(cfg.separator) if cfg.separator else []
    block_ids: dict[tuple[int, int], list[int]] = {}

    def ids_of(h: BlockHit) -> list[int]:
        key = (h.shard, h.block)
        if key not in block_ids:
            block_ids[key] = lm.encode(blocks.with_continuation(h) if cfg.continuation and blocks else h.text)
        return block_ids[key]

    def prefix(hs: list[BlockHit], budget: int) -> list[int]:
        out: list[int] = []
        for h in reversed(hs):  # best block last, right before the text; left truncation drops the worst first
            out += ids_of(h) + sep
        return out[-budget:] if budget > 0 else []

    seqs = []
    for j, (ti, b, e, f) in enumerate(jobs):
        seqs.append((j, -1, []))
        hs = hits[j][:n_blocks]
        budget = ctx - (e - b)
        if hs and budget > 0:
            if ensemble:
                seqs += [(j, v, prefix([h], budget)) for v, h in enumerate(hs)]
            else:
                seqs.append((j, 0, prefix(hs, budget)))
    return seqs


def _score_sequences(lm, seqs, jobs, per_ids, top: int) -> tuple[dict, dict]:
    """log p(target) of each sequence's scored positions, by (job, variant), and with `top` their most
    probable tokens, in batches of `lm.batch_size` right-padded sequences."""
    lp: dict[tuple[int, int], np.ndarray] = {}
    best_of: dict[tuple[int, int], TopTokens] = {}
    pad = lm.tokenizer.pad_token_id
    for i in range(0, len(seqs), lm.batch_size):
        chunk = seqs[i:i + lm.batch_size]
        rows = [(p + per_ids[jobs[j][0]][jobs[j][1]:jobs[j][2]], len(p)) for j, _, p in chunk]
        T = max(len(r) for r, _ in rows)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, (seq, _) in enumerate(rows):
            ids[r, :len(seq)] = torch.tensor(seq)
            mask[r, :len(seq)] = 1
        _, logits, _ = lm.forward(ids.to(lm.device), mask.to(lm.device))
        logprobs = torch.log_softmax(logits, dim=-1)
        for r, ((j, v, _), (_, plen)) in enumerate(zip(chunk, rows)):
            ti, b, e, f = jobs[j]
            tgt = torch.tensor(per_ids[ti][f + 1:e + 1], dtype=torch.long, device=logprobs.device)
            sel = logprobs[r, plen + f - b: plen + e - b]
            lp[(j, v)] = sel.gather(1, tgt[:, None])[:, 0].double().cpu().numpy()
            if top:
                t = torch.topk(sel, min(top, sel.shape[-1]), dim=-1)
                best_of[(j, v)] = TopTokens(t.indices.cpu().numpy().astype(np.int64), t.values.double().cpu().numpy())
    return lp, best_of


@torch.inference_mode()
def copy_test(lm, text: str, tokens: int | None = None) -> dict:
    """Can the model copy from its context? RIC-LM's gain rests on it: the retrieved block holds the text
    that follows, but only a model that reads it off its context profits. `text`'s first `tokens` tokens
    (default: as many as fit twice in the context) are scored twice in one sequence, [BOS] P P; returns the
    perplexity of the first and of the second copy and their ratio. A model with induction heads scores
    the second copy near perplexity 1; a ratio near 1 means the model ignores what its context says."""
    n = min(tokens or lm.context_length, (lm.context_length - 1) // 2)
    ids = lm.encode(text)[:n]
    if len(ids) < 2:
        raise SiloInputError("copy_test: the text has fewer than 2 tokens", "text")
    n = len(ids)
    x = torch.tensor([[lm.tokenizer.eos_token_id] + ids + ids], device=lm.device)
    _, logits, _ = lm.forward(x, torch.ones_like(x))
    lp = torch.log_softmax(logits[0, :-1].float(), -1).gather(1, x[0, 1:, None])[:, 0].double().cpu().numpy()
    first, second = float(math.exp(-lp[:n].mean())), float(math.exp(-lp[n:].mean()))
    return {"tokens": n, "ppl_first": first, "ppl_second": second, "ratio": second / first}


def ric_collect(lm, texts: Sequence[str] | Sequence[Sequence[int]], ric: RICConfig | dict | None = None,
                blocks: BlockStore | None = None, max_positions: int | None = None, top: int = 0) -> RICBatch:
    """Score texts (or token-id sequences) in RIC mode (see the module docstring); `max_positions` stops
    after that many positions; `top` keeps the most probable tokens at each position."""
    cfg = as_ric_config(ric)
    blocks = blocks if blocks is not None else lm.blocks(cfg.dense_model)
    jobs, per_ids, hits = retrieve_windows(lm, texts, cfg, blocks, cfg.n_blocks, max_positions)
    out = score_windows(lm, cfg, jobs, per_ids, hits, cfg.n_blocks, cfg.ensemble, blocks, top)
    return out.truncate(max_positions) if max_positions is not None else out


class RICRetriever:
    """RIC-LM over one datastore snapshot's blocks: retrieve with the text before the scored window (or
    the prompt) and prepend the best block(s); the model's own distribution is used as it is (no per-step
    mixer). The blocks a generation's prompt got are that sequence's (`SequenceRetrieval.blocks`), so one
    retriever serves any number of concurrent generations."""

    mode = "ric"
    mixer = None  # the model's own distribution at every step, over the prompt with blocks prepended

    def __init__(self, blocks: BlockStore, cfg: RICConfig | dict | None = None):
        self.blocks = blocks
        self.cfg = as_ric_config(cfg)
        self.store = blocks.store

    @property
    def store_generation(self) -> int:
        return self.store.generation

    def score(self, lm, texts: Sequence[str]) -> list[ScoreResult]:
        return self.score_ids(lm, [lm.text_ids(t) for t in texts])

    def score_ids(self, lm, id_lists: Sequence[Sequence[int]], top: int = 0) -> list[ScoreResult]:
        """logp with retrieved blocks; logp_parametric on the same windows without (see `SiloLM.score_ids`)."""
        rb = ric_collect(lm, id_lists, self.cfg, self.blocks, top=top)
        best = rb.top.agree_with(rb.targets, rb.logp) if rb.top is not None else None
        out = []
        for ti in range(len(id_lists)):
            sel = rb.text_index == ti
            out.append(ScoreResult(tokens=rb.targets[sel].tolist(), logp_parametric=rb.logp_lm[sel],
                                   logp=rb.logp[sel], mode=self.mode, store_generation=self.store_generation,
                                   top=best.rows(sel) if best is not None else None))
        return out

    def prepare(self, lm, prompt_ids: list[int], sampling, allowed=None) -> tuple[list[int], SequenceRetrieval]:
        """Retrieve with the prompt and prepend the top block(s), truncated from the left to leave room for
        the prompt and `sampling.max_new_tokens`; the sequence's state records them for attribution and the
        guard. `allowed(shard, doc)` (a VerbatimGuard's) says which documents' blocks may be prepended."""
        cfg = self.cfg
        if cfg.ensemble:
            raise SiloInputError("ric.ensemble applies to scoring only; generate with ensemble false", "ric.ensemble")
        p_ids = prompt_ids[1:]  # without BOS
        q = p_ids[-cfg.query_tokens:] if cfg.query_tokens else p_ids
        want = cfg.n_blocks if allowed is None else 4 * cfg.n_blocks + 16  # room for refused blocks
        hits = self.blocks.search([lm.tokenizer.decode(q)], want, cfg.retriever)[0] if q else []
        if allowed is not None:
            hits = [h for h in hits if allowed(h.shard, h.doc)][:cfg.n_blocks]
        budget = lm.context_length - 1 - len(p_ids) - sampling.max_new_tokens
        sep = lm.encode(cfg.separator) if cfg.separator else []
        pre: list[int] = []
        used: list[BlockHit] = []
        for h in hits:  # best first; keep whole lower-ranked blocks while they fit, then cut the last from the left
            if len(pre) >= budget:
                break
            used.append(h)
            pre = lm.encode(self.blocks.with_continuation(h) if cfg.continuation else h.text) + sep + pre
        pre = pre[-budget:] if budget > 0 else []
        if not pre:
            used = []
        state = SequenceRetrieval(blocks=list(zip(used, rank_shares(len(used)))))
        return [lm.tokenizer.eos_token_id] + pre + p_ids, state

    def documents(self, state: SequenceRetrieval, row=None) -> np.ndarray:
        """Keys of the prepended blocks' documents (what a VerbatimGuard follows at every step)."""
        return np.array(sorted({(h.shard << 32) | h.doc for h, _ in state.blocks}), dtype=np.int64)

    def attribute(self, text: str, steps: Sequence[GenerationStep], state: SequenceRetrieval | None = None,
                  span_min_chars: int | None = None) -> list[SentenceAttribution]:
        """Every sentence credited to the sequence's prepended blocks' documents, split by rank."""
        return attribute_blocks(text, state.blocks if state is not None else [], steps, self.store, span_min_chars)
