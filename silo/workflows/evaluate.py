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
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from pydantic import Field
from tqdm.auto import tqdm

from silo.core.config import StageConfig
from silo.core.corpus import Document, load_documents
from silo.datastore.blocks import BlockStore
from silo.datastore.store import DatastoreError
from silo.model.knn import KNNConfig
from silo.model.lm import SiloLM
from silo.model.ric import RICConfig, ric_collect, ric_plan
from silo.model.types import PositionBatch

from .tuning import GridConfig, KnnCache, Sweep, ppl, tune

__all__ = ["EvalConfig", "EvalResult", "DomainResult", "GridConfig", "RICEvalConfig", "evaluate", "markdown_table",
           "domain_texts", "cached_collect", "open_blocks", "ppl"]


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


@dataclass
class DomainResult:
    """One domain's row: test perplexity of each method (and the validation numbers tuning saw)."""

    domain: str
    tokens: int
    parametric: float
    reference: float | None = None
    val_parametric: float | None = None
    val_knn: float | None = None
    knn: float | None = None
    knn_settings: dict | None = None  # k, lmbda, temperature
    gap_closed: float | None = None
    ric: dict[str, float] = field(default_factory=dict)  # retriever -> perplexity
    ric_parametric: float | None = None  # the RIC windows without a block
    ric_block_used: float | None = None
    ric_gap_closed: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None and v != {}}

    @classmethod
    def from_json(cls, data: dict) -> "DomainResult":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EvalResult:
    """What `evaluate` returns (and writes as results.json); `sweeps` (validation grids) go to sweep.json."""

    model: str
    store: str | None
    reference_model: str | None
    store_entries: int
    window: int
    stride: int
    max_tokens: int
    tuned: bool
    domains: list[DomainResult]
    seconds: float = 0.0
    ric: dict | None = None  # the RIC-LM protocol used (retrievers, windows, blocks)
    sweeps: dict[str, Sweep] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = {"model": self.model, "store": self.store, "reference_model": self.reference_model,
               "store_entries": self.store_entries, "window": self.window, "stride": self.stride,
               "max_tokens": self.max_tokens, "tuned": self.tuned, "domains": [d.to_json() for d in self.domains],
               "seconds": self.seconds}
        if self.ric is not None:
            out["ric"] = self.ric
        return out

    def domain(self, name: str) -> DomainResult | None:
        return next((d for d in self.domains if d.domain == name), None)


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


def open_blocks(cfg: EvalConfig, lm: SiloLM) -> BlockStore | None:
    """The block store of lm's datastore for RIC-LM rows, or None (eval.ric.enabled, blocks present)."""
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
    pos = lm.collect(texts).truncate(n)
    if cache is not None:
        cache[ck] = pos
    return pos


def evaluate(cfg: EvalConfig, progress: bool = True, lm: SiloLM | None = None, ref: SiloLM | None = None,
             cache: dict | None = None, write: bool = True) -> EvalResult:
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
        row = DomainResult(domain=dom, tokens=int(len(te.targets)), parametric=ppl(te.logp_lm))
        if ref is not None:
            row.reference = ppl(cached_collect(ref, test[dom], cfg.max_tokens, cache, ("test", dom)).logp_lm)
        if lm.store is not None:
            test_cache = KnnCache.search(lm.store, te, k_max)
            if cfg.tune:
                va = cached_collect(lm, val[dom], cfg.max_tokens, cache, ("val", dom))
                sweep = tune(KnnCache.search(lm.store, va, k_max), cfg.grid)
                sweeps[dom] = sweep
                settings = sweep.settings
                row.val_parametric = ppl(va.logp_lm)
                row.val_knn = sweep.best["val_ppl"]
            else:
                settings = {"k": cfg.knn.k, "lmbda": cfg.knn.lmbda, "temperature": cfg.knn.temperature}
            row.knn = ppl(test_cache.logp(settings["k"], settings["lmbda"], settings["temperature"]))
            row.knn_settings = settings
            if row.reference is not None and row.parametric - row.reference > 0:
                row.gap_closed = (row.parametric - row.knn) / (row.parametric - row.reference)
        for r in retrievers:
            rb = ric_collect(lm, test[dom], cfg.ric.for_retriever(r), blocks, max_positions=cfg.max_tokens)
            row.ric[r] = ppl(rb.logp)
            # the same windows without a block: RIC-LM's own parametric baseline (shorter context)
            row.ric_parametric = ppl(rb.logp_lm)
            row.ric_block_used = float(rb.used_block.mean()) if len(rb.used_block) else 0.0
            if row.reference is not None and row.parametric - row.reference > 0:
                row.ric_gap_closed[r] = (row.parametric - row.ric[r]) / (row.parametric - row.reference)
        results.append(row)
    out = EvalResult(model=cfg.model, store=cfg.store, reference_model=cfg.reference_model,
                     store_entries=lm.store.num_entries if lm.store else 0, window=lm.window, stride=lm.stride,
                     max_tokens=cfg.max_tokens, tuned=cfg.tune, domains=results, seconds=round(time.time() - t0, 1),
                     sweeps=sweeps)
    if retrievers:
        w, st = ric_plan(lm, cfg.ric.for_retriever(retrievers[0]), blocks)
        out.ric = {"retrievers": retrievers, "window": w, "stride": st, "n_blocks": cfg.ric.n_blocks,
                   "ensemble": cfg.ric.ensemble, "block_tokens": blocks.block_tokens, "blocks": blocks.num_blocks}
    if write:
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(out.to_json(), indent=1))
        (out_dir / "sweep.json").write_text(json.dumps({d: s.to_json() for d, s in sweeps.items()}, indent=1))
        (out_dir / "results.md").write_text(markdown_table(out))
    return out


def markdown_table(out: EvalResult) -> str:
    rows = out.domains
    has_ref = any(r.reference is not None for r in rows)
    has_knn = any(r.knn is not None for r in rows)
    head = ["domain", "tokens", "parametric"]
    if has_knn:
        head += ["kNN-LM", "k", "λ", "τ"]
    if has_ref:
        head += ["reference"]
    if has_knn and has_ref:
        head += ["gap closed"]
    rics = list(dict.fromkeys(name for r in rows for name in r.ric))
    for name in rics:
        head += [f"RIC-LM ({name})"] + ([f"gap closed ({name})"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r.domain, str(r.tokens), f"{r.parametric:.2f}"]
        if has_knn:
            s = r.knn_settings or {}
            cells += [f"{r.knn:.2f}" if r.knn is not None else "", str(s.get("k", "")),
                      f"{s['lmbda']:.2f}" if s else "", f"{s['temperature']:.3g}" if s else ""]
        if has_ref:
            cells += [f"{r.reference:.2f}" if r.reference is not None else ""]
        if has_knn and has_ref:
            cells += [f"{100 * r.gap_closed:.0f}%" if r.gap_closed is not None else "n/a"]
        for name in rics:
            cells += [f"{r.ric[name]:.2f}" if name in r.ric else ""]
            if has_ref:
                g = r.ric_gap_closed
                cells += [f"{100 * g[name]:.0f}%" if name in g else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
