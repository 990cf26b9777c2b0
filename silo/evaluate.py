"""Perplexity per evaluation domain: parametric-only, kNN-LM (tuned on validation), reference LM.

Follows SILO's protocol: texts are read in sliding windows (window = model context, stride = half of it
by default; SILO uses 1,024/512), only the new tokens of each window are scored, perplexity is
exp(mean NLL). kNN settings (k, lambda, tau) are tuned per domain on the validation split from one
search at the largest k, and reported on the test split. The "gap closed" is
(parametric - kNN) / (parametric - reference): the share of the distance to an LM trained on
everything that the datastore recovers.

RIC-LM rows (retrieval in context, silo/ric.py) are added per retriever when the store has text blocks
(`silo datastore build-blocks`; `eval.ric.enabled: auto`): the retrieved block is prepended to windows of
`context - block_tokens` tokens, and its gap closed is measured against the same parametric and reference
numbers as kNN-LM.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from typing import Literal

from pydantic import Field
from tqdm.auto import tqdm

from silo.training.config import StageConfig
from silo.training.corpus import Document, load_documents

from .knn import KNNConfig, interpolate, knn_target_logprob
from .lm import PositionBatch, SiloLM
from .ric import RICConfig, ric_collect


class GridConfig(StageConfig):
    k: list[int] = [8, 32, 128]
    lmbda: list[float] = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    # tau as multiples of the median top-1 squared distance on the validation keys ("relative"), or
    # absolute values when temperature_scale is "absolute".
    temperature: list[float] = [0.1, 0.3, 1.0, 3.0]
    temperature_scale: str = Field("relative", pattern="^(relative|absolute)$")


class RICEvalConfig(RICConfig):
    enabled: bool | Literal["auto"] = "auto"  # auto: RIC-LM rows when the store has blocks
    retrievers: list[Literal["bm25", "dense"]] = ["bm25", "dense"]

    def for_retriever(self, retriever: str) -> RICConfig:
        return RICConfig(**self.model_dump(exclude={"enabled", "retrievers", "retriever"}), retriever=retriever)


class EvalConfig(StageConfig):
    model: str
    store: str | None = None
    reference_model: str | None = None
    val: list[str] = ["pkg:demo/val"]
    test: list[str] = ["pkg:demo/test"]
    domains: list[str] | None = None
    max_tokens: int = Field(8000, gt=0)  # scored tokens per domain and split
    window: int | None = Field(None, gt=1)
    stride: int | None = Field(None, gt=0)
    tune: bool = True
    knn: KNNConfig = KNNConfig()  # used as-is when tune is false
    grid: GridConfig = GridConfig()
    ric: RICEvalConfig = RICEvalConfig()
    output_dir: str = "runs/eval"


def ppl(logp: np.ndarray) -> float:
    return float(math.exp(-np.mean(logp))) if len(logp) else float("nan")


def domain_texts(docs: list[Document], max_tokens: int, chars_per_token: float = 6.0) -> dict[str, list[str]]:
    """Group documents by domain, keeping roughly enough text for `max_tokens` scored tokens."""
    out: dict[str, list[str]] = {}
    budget: dict[str, float] = {}
    for d in docs:
        dom = d.domain or "default"
        left = budget.setdefault(dom, max_tokens * chars_per_token)
        if left <= 0:
            continue
        text = d.text[: int(left)]
        out.setdefault(dom, []).append(text)
        budget[dom] = left - len(text)
    return out


def truncate(pos: PositionBatch, n: int) -> PositionBatch:
    return PositionBatch(pos.targets[:n], pos.logp_lm[:n], pos.keys[:n], pos.text_index[:n])


@dataclass
class KnnCache:
    """One search at the largest k, reused for every (k, lambda, tau)."""

    logp_lm: np.ndarray
    targets: np.ndarray
    distances: np.ndarray
    tokens: np.ndarray

    def logp(self, k: int, lmbda: float, tau: float) -> np.ndarray:
        lk = knn_target_logprob(self.distances[:, :k], self.tokens[:, :k], self.targets, tau)
        return interpolate(self.logp_lm, lk, lmbda)


def tune(cache: KnnCache, grid: GridConfig, scale: float) -> tuple[dict, list[dict]]:
    rows = []
    for k in grid.k:
        for t in grid.temperature:
            tau = t * scale if grid.temperature_scale == "relative" else t
            lk = knn_target_logprob(cache.distances[:, :k], cache.tokens[:, :k], cache.targets, tau)
            for lam in grid.lmbda:
                rows.append({"k": k, "lmbda": lam, "temperature": tau,
                             "val_ppl": ppl(interpolate(cache.logp_lm, lk, lam))})
    best = min(rows, key=lambda r: r["val_ppl"])
    return best, rows


def open_blocks(cfg: EvalConfig, lm: SiloLM):
    """The block store of lm's datastore for RIC-LM rows, or None (eval.ric.enabled, blocks present)."""
    from silo.datastore.blocks import BlockStore
    from silo.datastore.store import DatastoreError

    if cfg.ric.enabled is False or lm.store is None:
        if cfg.ric.enabled is True and lm.store is None:
            raise DatastoreError("eval.ric.enabled is true but eval.store is not set; RIC-LM needs a store with blocks")
        return None
    try:
        blocks = BlockStore(lm.store, cfg.ric.dense_model)
    except DatastoreError:
        if cfg.ric.enabled is True:
            raise
        return None
    missing = [r for r in cfg.ric.retrievers if r not in blocks.retrievers()]
    if missing and cfg.ric.enabled is True:
        raise DatastoreError(f"eval.ric.retrievers: the blocks of {lm.store.path} have no {missing} index; "
                             f"rebuild with `silo datastore build-blocks --store {lm.store.path}`")
    return blocks


def cached_collect(lm: SiloLM, texts: list[str], n: int, cache: dict | None, key) -> PositionBatch:
    """lm.collect truncated to n positions, memoised in `cache` (the research harness reuses passes)."""
    ck = (lm.fingerprint, lm.window, lm.stride, key, n)  # not id(lm): ids are reused after a model is freed
    if cache is not None and ck in cache:
        return cache[ck]
    pos = truncate(lm.collect(texts), n)
    if cache is not None:
        cache[ck] = pos
    return pos


def evaluate(cfg: EvalConfig, progress: bool = True, lm: SiloLM | None = None, ref: SiloLM | None = None,
             cache: dict | None = None, write: bool = True) -> dict:
    """Run the evaluation and write results.json / results.md / sweep.json under cfg.output_dir.

    `lm`/`ref` reuse loaded models (lm may carry a store snapshot other than cfg.store); `cache` memoises
    the LM passes across calls; `write=False` only returns the results.
    """
    t0 = time.time()
    if lm is None:
        lm = SiloLM.load(cfg.model, cfg.store, knn=cfg.knn, window=cfg.window, stride=cfg.stride)
    if ref is None and cfg.reference_model:
        ref = SiloLM.load(cfg.reference_model, window=cfg.window, stride=cfg.stride)
    val = domain_texts(load_documents(cfg.val, cfg.domains), cfg.max_tokens)
    test = domain_texts(load_documents(cfg.test, cfg.domains), cfg.max_tokens)
    domains = [d for d in test if d in val] if cfg.tune else list(test)
    k_max = max(cfg.grid.k) if cfg.tune else cfg.knn.k
    blocks = open_blocks(cfg, lm)
    retrievers = [r for r in cfg.ric.retrievers if blocks is not None and r in blocks.retrievers()]

    results, sweeps = [], {}
    bar = tqdm(domains, desc="evaluating", unit="domain", disable=not progress or None)
    for dom in bar:
        bar.set_postfix(domain=dom)
        te = cached_collect(lm, test[dom], cfg.max_tokens, cache, ("test", dom))
        row = {"domain": dom, "tokens": int(len(te.targets)), "parametric": ppl(te.logp_lm)}
        if ref is not None:
            row["reference"] = ppl(cached_collect(ref, test[dom], cfg.max_tokens, cache, ("test", dom)).logp_lm)
        if lm.store is not None:
            nb = lm.store.search(te.keys, k_max)
            test_cache = KnnCache(te.logp_lm, te.targets, nb.distances, nb.tokens)
            if cfg.tune:
                va = cached_collect(lm, val[dom], cfg.max_tokens, cache, ("val", dom))
                vnb = lm.store.search(va.keys, k_max)
                scale = float(np.median(vnb.distances[:, 0][np.isfinite(vnb.distances[:, 0])])) or 1.0
                best, rows = tune(KnnCache(va.logp_lm, va.targets, vnb.distances, vnb.tokens), cfg.grid, scale)
                sweeps[dom] = {"distance_scale": scale, "rows": rows}
                settings = {"k": best["k"], "lmbda": best["lmbda"], "temperature": best["temperature"]}
                row["val_parametric"] = ppl(va.logp_lm)
                row["val_knn"] = best["val_ppl"]
            else:
                settings = {"k": cfg.knn.k, "lmbda": cfg.knn.lmbda, "temperature": cfg.knn.temperature}
            row["knn"] = ppl(test_cache.logp(settings["k"], settings["lmbda"], settings["temperature"]))
            row["knn_settings"] = settings
            if "reference" in row and row["parametric"] - row["reference"] > 0:
                row["gap_closed"] = (row["parametric"] - row["knn"]) / (row["parametric"] - row["reference"])
        for r in retrievers:
            rb = ric_collect(lm, test[dom], cfg.ric.for_retriever(r), blocks, max_positions=cfg.max_tokens)
            row.setdefault("ric", {})[r] = ppl(rb.logp)
            # the same windows without a block: RIC-LM's own parametric baseline (shorter context)
            row["ric_parametric"] = ppl(rb.logp_lm)
            row["ric_block_used"] = float(rb.used_block.mean()) if len(rb.used_block) else 0.0
            if "reference" in row and row["parametric"] - row["reference"] > 0:
                row.setdefault("ric_gap_closed", {})[r] = (row["parametric"] - row["ric"][r]) / (row["parametric"] - row["reference"])
        results.append(row)
    out = {
        "model": cfg.model, "store": cfg.store, "reference_model": cfg.reference_model,
        "store_entries": lm.store.num_entries if lm.store else 0,
        "window": lm.window, "stride": lm.stride, "max_tokens": cfg.max_tokens, "tuned": cfg.tune,
        "domains": results, "seconds": round(time.time() - t0, 1),
    }
    if retrievers:
        from .ric import ric_plan

        w, st = ric_plan(lm, cfg.ric.for_retriever(retrievers[0]), blocks)
        out["ric"] = {"retrievers": retrievers, "window": w, "stride": st, "n_blocks": cfg.ric.n_blocks,
                      "ensemble": cfg.ric.ensemble, "block_tokens": blocks.block_tokens, "blocks": blocks.num_blocks}
    if write:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out, indent=1))
        (out_dir / "sweep.json").write_text(json.dumps(sweeps, indent=1))
        (out_dir / "results.md").write_text(markdown_table(out))
    out["_sweeps"] = sweeps  # for callers; not part of results.json
    return out


def markdown_table(out: dict) -> str:
    has_ref = any("reference" in r for r in out["domains"])
    has_knn = any("knn" in r for r in out["domains"])
    head = ["domain", "tokens", "parametric"]
    if has_knn:
        head += ["kNN-LM", "k", "λ", "τ"]
    if has_ref:
        head += ["reference"]
    if has_knn and has_ref:
        head += ["gap closed"]
    rics = list(dict.fromkeys(name for r in out["domains"] for name in r.get("ric", {})))
    for name in rics:
        head += [f"RIC-LM ({name})"] + ([f"gap closed ({name})"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in out["domains"]:
        cells = [r["domain"], str(r["tokens"]), f"{r['parametric']:.2f}"]
        if has_knn:
            s = r.get("knn_settings", {})
            cells += [f"{r['knn']:.2f}" if "knn" in r else "", str(s.get("k", "")),
                      f"{s['lmbda']:.2f}" if s else "", f"{s['temperature']:.3g}" if s else ""]
        if has_ref:
            cells += [f"{r['reference']:.2f}" if "reference" in r else ""]
        if has_knn and has_ref:
            cells += [f"{100 * r['gap_closed']:.0f}%" if "gap_closed" in r else "n/a"]
        for name in rics:
            cells += [f"{r['ric'][name]:.2f}" if name in r.get("ric", {}) else ""]
            if has_ref:
                g = r.get("ric_gap_closed", {})
                cells += [f"{100 * g[name]:.0f}%" if name in g else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
