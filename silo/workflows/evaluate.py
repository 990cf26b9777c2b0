"""Perplexity per evaluation domain: parametric-only, kNN-LM (tuned on validation), reference LM.

Follows SILO's protocol: texts are read in sliding windows (window = model context, stride = half of it
by default; SILO uses 1,024/512), only the new tokens of each window are scored, perplexity is
exp(mean NLL). Two kNN-LM rows:

* fixed lambda (the paper's protocol): lambda and tau fitted per domain on the validation split by
  maximum likelihood (continuous), k chosen from `grid.k` (up to 1,024) on a held-out half, from one
  search at the largest k; reported on the test split;
* gated: the store's fitted gate (gate.json; silo/model/gate.py), one for all domains, the mixture that
  `silo generate` and the server use. Without a saved gate one is fitted on the validation split for
  this evaluation (not saved). With its retrieval skipping, the share of searches skipped is reported.

Validation and test documents that share a 13-gram with the store are reported and left out
(`keep_overlap` keeps them). A setting chosen on the edge of its search range is reported as a warning.
The "gap closed" is (parametric - kNN) / (parametric - reference): the share of the distance to an LM
trained on everything that the datastore recovers.

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

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from silo.core.config import StageConfig
from silo.core.corpus import Document, load_documents
from silo.datastore.blocks import BlockStore
from silo.datastore.store import DatastoreError
from silo.model.knn import KNNConfig, KNNRetriever, knn_target_logprob, mix_logp
from silo.model.lm import SiloLM
from silo.model.ric import RICConfig, ric_collect, ric_plan
from silo.model.types import PositionBatch

from .decontam import OverlapIndex, decontaminate
from .gate_fit import GateConfig, distance_scale, fit_fixed, fit_gate, validation_positions
from .tuning import GridConfig, KnnCache, Sweep, domain_texts, ppl, tune

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
    knn: KNNConfig = KNNConfig()  # the fixed row's settings when tune is false
    grid: GridConfig = GridConfig()
    gate: Literal["auto", "store", "fit", "off"] = "auto"  # gated row: the store's gate (fit one when missing)
    keep_overlap: bool = False  # keep validation/test documents that share 13-grams with the store
    ric: RICEvalConfig = RICEvalConfig()
    output_dir: str = "runs/eval"
    device: str = "auto"  # the models': auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 (or float16) on a GPU


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
    knn_settings: dict | None = None  # k, lmbda, tau
    gap_closed: float | None = None
    ric: dict[str, float] = field(default_factory=dict)  # retriever -> perplexity
    ric_parametric: float | None = None  # the RIC windows without a block
    ric_block_used: float | None = None
    ric_gap_closed: dict[str, float] = field(default_factory=dict)
    knn_gated: float | None = None  # the gated mixture (what is served)
    gated_lambda: float | None = None  # its mean lambda on these tokens
    gap_closed_gated: float | None = None
    knn_gated_skip: float | None = None  # the gated mixture with retrieval skipping at its threshold
    skipped: float | None = None  # share of positions whose search was skipped
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if v is not None and v != {} and v != []}

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
    gate: dict | None = None  # the gate of the gated row (describe()) and where it came from
    overlaps: list[dict] = field(default_factory=list)  # held-out documents sharing 13-grams with the store
    sweeps: dict[str, Sweep] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = {"model": self.model, "store": self.store, "reference_model": self.reference_model,
               "store_entries": self.store_entries, "window": self.window, "stride": self.stride,
               "max_tokens": self.max_tokens, "tuned": self.tuned, "domains": [d.to_json() for d in self.domains],
               "seconds": self.seconds, "overlaps": self.overlaps}
        for key in ("ric", "gate"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def domain(self, name: str) -> DomainResult | None:
        return next((d for d in self.domains if d.domain == name), None)


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
        lm = SiloLM.load(cfg.model, cfg.store, knn=cfg.knn, window=cfg.window, stride=cfg.stride, device=cfg.device,
                         dtype=cfg.dtype)
    if ref is None and cfg.reference_model:
        ref = SiloLM.load(cfg.reference_model, window=cfg.window, stride=cfg.stride, device=cfg.device,
                          dtype=cfg.dtype)
    val_docs, test_docs = load_documents(cfg.val, cfg.domains), load_documents(cfg.test, cfg.domains)
    overlaps = []
    if lm.store is not None:
        index = OverlapIndex(lm.store)
        val_docs, ov_val = decontaminate(val_docs, lm.store, cfg.keep_overlap, index)
        test_docs, ov_test = decontaminate(test_docs, lm.store, cfg.keep_overlap, index)
        overlaps = [{**o.to_json(), "split": split, "kept": cfg.keep_overlap}
                    for split, ovs in (("val", ov_val), ("test", ov_test)) for o in ovs]
        for split, kept, ovs in (("val", val_docs, ov_val), ("test", test_docs, ov_test)):
            if ovs and not kept:
                raise DatastoreError(f"eval.{split}: all {len(ovs)} document(s) share 13-grams with the store and "
                                     "were left out; pass --keep-overlap (eval.keep_overlap: true) to keep them")
    val = domain_texts(val_docs, cfg.max_tokens)
    test = domain_texts(test_docs, cfg.max_tokens)
    domains = [d for d in test if d in val] if cfg.tune else list(test)
    blocks = open_blocks(cfg, lm)
    retrievers = [r for r in cfg.ric.retrievers if blocks is not None and r in blocks.retrievers()]
    gate, gate_info = _gate_for(cfg, lm, val_docs, progress)
    k_max = max(max(cfg.grid.k) if cfg.tune else cfg.knn.k, gate.k if gate else 0)

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
                vcache = KnnCache.search(lm.store, va, k_max)
                sweeps[dom] = tune(vcache, cfg.grid)  # the grid: lambda-sensitivity curves of the research report
                nb = vcache.neighbors()
                fit, _ = fit_fixed(nb, va, cfg.grid.k, distance_scale(nb))
                settings = {"k": fit.k, "lmbda": fit.lmbda, "tau": fit.tau}
                row.val_parametric = ppl(va.logp_lm)
                row.val_knn = ppl(vcache.logp(fit.k, fit.lmbda, fit.tau))
                row.warnings += [f"{dom} (fixed lambda): {w}" for w in fit.warnings]
            else:
                settings = {"k": cfg.knn.k, "lmbda": cfg.knn.lmbda, "tau": cfg.knn.tau}
            row.knn = ppl(test_cache.logp(settings["k"], settings["lmbda"], settings["tau"]))
            row.knn_settings = settings
            if row.reference is not None and row.parametric - row.reference > 0:
                row.gap_closed = (row.parametric - row.knn) / (row.parametric - row.reference)
            if gate is not None:
                _gated_row(row, lm, gate, te, test_cache)
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
                     sweeps=sweeps, gate=gate_info, overlaps=overlaps)
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


def _gate_for(cfg: EvalConfig, lm: SiloLM, val_docs: list[Document], progress: bool):
    """The gate of the gated row, and a description of it (None, None when there is no store or it is off)."""
    if lm.store is None or cfg.gate == "off":
        return None, None
    gate = lm.gate() if cfg.gate in ("auto", "store") else None
    if gate is not None:
        return gate, {**gate.describe(), "source": f"{lm.store.path}/gate.json"}
    if cfg.gate == "store":
        raise DatastoreError(f"{lm.store.path}: eval.gate is 'store' but the store has no gate; "
                             "fit one with `silo datastore fit-gate`")
    pos, _ = validation_positions(lm, val_docs, cfg.max_tokens)
    nb = lm.store.search(pos.keys, max(GateConfig.model_fields["k"].default))
    gate, report = fit_gate(lm.store, nb, pos, GateConfig.model_fields["k"].default, bos=lm.tokenizer.eos_token_id)
    if progress:
        print(f"eval: fitted a gate on the validation split for this evaluation (not saved): k={gate.k}")
    return gate, {**gate.describe(), "source": "fitted on eval.val for this evaluation", "warnings": report["warnings"]}


def _gated_row(row: DomainResult, lm: SiloLM, gate, te: PositionBatch, test_cache: KnnCache) -> None:
    """The gated mixture's perplexity on a domain's test positions (from the search already made), and with
    its retrieval skipping."""
    from silo.datastore.store import Neighbors

    nb = test_cache.neighbors()
    retr = KNNRetriever(lm.store, gate, lm.vocab_size, bos=lm.tokenizer.eos_token_id)
    row.knn_gated = ppl(retr.mix_targets(te, nb))
    every = np.ones(len(te.targets), bool)
    row.gated_lambda = float(retr.lambdas(nb, te.lm, every, retr.recent(nb, te, every), retr.match(nb, te.context)).mean())
    if row.reference is not None and row.parametric - row.reference > 0:
        row.gap_closed_gated = (row.parametric - row.knn_gated) / (row.parametric - row.reference)
    if gate.skip is not None and gate.skip.threshold > 0:
        skipping = KNNRetriever(lm.store, gate, lm.vocab_size, skip=gate.skip, skip_threshold=gate.skip.threshold,
                                bos=lm.tokenizer.eos_token_id)
        searched = gate.skip.predict(te.keys, te.lm) >= gate.skip.threshold
        keep = Neighbors.empty(len(te.targets), nb.distances.shape[1])
        for full, got in ((keep.distances, nb.distances), (keep.tokens, nb.tokens), (keep.shard, nb.shard),
                          (keep.ids, nb.ids)):
            full[searched] = got[searched]
        match = skipping.match(keep, te.context)
        lam = skipping.lambdas(keep, te.lm, searched, skipping.recent(keep, te, searched), match)
        lk = knn_target_logprob(keep.distances[:, :gate.k], keep.tokens[:, :gate.k], te.targets,
                                gate.taus(keep), gate.bonus(match))
        row.knn_gated_skip = ppl(mix_logp(te.logp_lm, lk, lam))
        row.skipped = float(1 - searched.mean())


def markdown_table(out: EvalResult) -> str:
    rows = out.domains
    has_ref = any(r.reference is not None for r in rows)
    has_knn = any(r.knn is not None for r in rows)
    has_gate = any(r.knn_gated is not None for r in rows)
    has_skip = any(r.skipped is not None for r in rows)
    head = ["domain", "tokens", "parametric"]
    if has_knn:
        head += ["kNN-LM fixed λ", "k", "λ", "τ"]
    if has_gate:
        head += ["kNN-LM gated", "mean λ"] + (["gated, skipping", "skipped"] if has_skip else [])
    if has_ref:
        head += ["reference"]
    if has_knn and has_ref:
        head += ["gap closed (fixed)"] + (["gap closed (gated)"] if has_gate else [])
    rics = list(dict.fromkeys(name for r in rows for name in r.ric))
    for name in rics:
        head += [f"RIC-LM ({name})"] + ([f"gap closed ({name})"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def num(v, fmt="{:.2f}"):
        return fmt.format(v) if v is not None else ""

    def pct(v):
        return f"{100 * v:.0f}%" if v is not None else "n/a"

    for r in rows:
        cells = [r.domain, str(r.tokens), f"{r.parametric:.2f}"]
        if has_knn:
            s = r.knn_settings or {}
            cells += [num(r.knn), str(s.get("k", "")), f"{s['lmbda']:.2f}" if s else "", f"{s['tau']:.3g}" if s else ""]
        if has_gate:
            cells += [num(r.knn_gated), num(r.gated_lambda)]
            if has_skip:
                cells += [num(r.knn_gated_skip), num(r.skipped, "{:.0%}")]
        if has_ref:
            cells += [num(r.reference)]
        if has_knn and has_ref:
            cells += [pct(r.gap_closed)] + ([pct(r.gap_closed_gated)] if has_gate else [])
        for name in rics:
            cells += [num(r.ric.get(name))]
            if has_ref:
                cells += [pct(r.ric_gap_closed.get(name))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [w for r in rows for w in r.warnings] + (out.gate or {}).get("warnings", [])
    if out.overlaps:
        notes.append(f"{len(out.overlaps)} held-out document(s) share 13-grams with the store "
                     f"({'kept' if out.overlaps[0]['kept'] else 'left out'}): "
                     + ", ".join(o["document_id"] for o in out.overlaps[:10]))
    return "\n".join(lines) + "\n" + "".join(f"\nwarning: {n}" for n in notes) + ("\n" if notes else "")
