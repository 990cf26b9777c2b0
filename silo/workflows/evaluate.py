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

Validation and test documents that are near-copies of store text (at least `overlap_fraction` of their
13-grams in the store) are reported and left out (`keep_overlap` keeps them); those sharing a few stock
phrases are kept, with their fraction reported. Every domain given appears in the table: one whose test
text is missing or was left out, or (fixed row) whose validation text is, has its row with the reason. A
setting chosen on the edge of its search range is reported as a warning.
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

from .decontam import OVERLAP_FRACTION, OverlapIndex, decontaminate, emptied_domains, overlap_lines
from .gate_fit import GateConfig, GateFitError, distance_scale, fit_fixed, fit_store_gate
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
    keep_overlap: bool = False  # keep validation/test documents that are near-copies of store text
    overlap_fraction: float = Field(OVERLAP_FRACTION, gt=0.0, le=1.0)  # share of 13-grams that makes a near-copy
    ric: RICEvalConfig = RICEvalConfig()
    output_dir: str = "runs/eval"
    device: str = "auto"  # the models': auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 (or float16) on a GPU


@dataclass
class DomainResult:
    """One domain's row: test perplexity of each method (and the validation numbers tuning saw)."""

    domain: str
    tokens: int
    parametric: float | None = None
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
    reason: str | None = None  # why a number is missing (no test text, no validation to tune on)

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


@dataclass
class HeldOut:
    """The held-out text of an evaluation after decontamination: texts per domain and split, every
    overlapping document, and why a domain has no text in a split (its row says so)."""

    val: dict[str, list[str]]
    test: dict[str, list[str]]
    val_docs: list[Document]
    domains: list[str]  # every domain given, in order
    overlaps: list[dict]
    missing: dict[str, dict[str, str]]  # split -> domain -> reason


def held_out_text(cfg: EvalConfig, lm: SiloLM, progress: bool) -> HeldOut:
    """Load val and test, leave out near-copies of store text (reported per document, with its fraction),
    and name each domain a split lost or never had."""
    given = {"val": load_documents(cfg.val, cfg.domains), "test": load_documents(cfg.test, cfg.domains)}
    kept, overlaps, missing = dict(given), [], {"val": {}, "test": {}}
    index = OverlapIndex(lm.store) if lm.store is not None else None
    for split, docs in given.items():
        if index is None:
            continue
        kept[split], ovs = decontaminate(docs, lm.store, cfg.keep_overlap, index, cfg.overlap_fraction)
        overlaps += [{**o.to_json(), "split": split, "kept": cfg.keep_overlap or not o.near_copy} for o in ovs]
        emptied = emptied_domains(docs, kept[split])
        for line in overlap_lines(f"eval.{split}", ovs, emptied, cfg.keep_overlap):
            if progress or "DOMAIN" in line:
                print(f"eval: {'WARNING: ' if 'DOMAIN' in line else ''}{line}")
        for dom, n in emptied.items():
            missing[split][dom] = f"all {n} {split} document(s) left out as near-copies of the store"
    names = list(dict.fromkeys(cfg.domains or [d.domain or "default" for s in given.values() for d in s]))
    for split in ("val", "test"):
        have = {d.domain or "default" for d in given[split]}
        for dom in names:
            if dom not in have:
                missing[split].setdefault(dom, f"no {split} documents given")
    return HeldOut(domain_texts(kept["val"], cfg.max_tokens), domain_texts(kept["test"], cfg.max_tokens),
                   kept["val"], names, overlaps, missing)


def evaluate(cfg: EvalConfig, progress: bool = True, lm: SiloLM | None = None, ref: SiloLM | None = None,
             cache: dict | None = None, write: bool = True) -> EvalResult:
    """Run the evaluation and write results.json / results.md / sweep.json under cfg.output_dir.

    `lm`/`ref` reuse loaded models (lm may carry a store snapshot other than cfg.store); `cache` memoises
    the LM passes across calls; `write=False` only returns the results. Every domain given appears in the
    table; one without test text (or, for the fixed row, without validation text) says why.
    """
    t0 = time.time()
    if lm is None:
        lm = SiloLM.load(cfg.model, cfg.store, knn=cfg.knn, window=cfg.window, stride=cfg.stride, device=cfg.device,
                         dtype=cfg.dtype)
    if ref is None and cfg.reference_model:
        ref = SiloLM.load(cfg.reference_model, window=cfg.window, stride=cfg.stride, device=cfg.device,
                          dtype=cfg.dtype)
    held = held_out_text(cfg, lm, progress)
    blocks = open_blocks(cfg, lm)
    retrievers = [r for r in cfg.ric.retrievers if blocks is not None and r in blocks.retrievers()]
    gate, gate_info = _gate_for(cfg, lm, held.val_docs, progress)
    k_max = max(max(cfg.grid.k) if cfg.tune else cfg.knn.k, gate.k if gate else 0)
    results, sweeps = [], {}
    bar = tqdm(held.domains, desc="evaluating", unit="domain", disable=not progress or None)
    for dom in bar:
        bar.set_postfix(domain=dom)
        if dom not in held.test:
            results.append(DomainResult(domain=dom, tokens=0, reason=f"no numbers: {held.missing['test'][dom]}"))
            continue
        row = _domain_row(cfg, lm, ref, held, dom, gate, k_max, cache, sweeps)
        for r in retrievers:
            _ric_cells(row, lm, cfg, held.test[dom], r, blocks)
        results.append(row)
    out = EvalResult(model=cfg.model, store=cfg.store, reference_model=cfg.reference_model,
                     store_entries=lm.store.num_entries if lm.store else 0, window=lm.window, stride=lm.stride,
                     max_tokens=cfg.max_tokens, tuned=cfg.tune, domains=results, seconds=round(time.time() - t0, 1),
                     sweeps=sweeps, gate=gate_info, overlaps=held.overlaps)
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


def _domain_row(cfg: EvalConfig, lm: SiloLM, ref: SiloLM | None, held: HeldOut, dom: str, gate, k_max: int,
                cache: dict | None, sweeps: dict) -> DomainResult:
    """One domain's row: parametric, reference, the fixed lambda tuned on its validation text (or the
    configured one), the served gate."""
    te = cached_collect(lm, held.test[dom], cfg.max_tokens, cache, ("test", dom))
    row = DomainResult(domain=dom, tokens=int(len(te.targets)), parametric=ppl(te.logp_lm))
    if ref is not None:
        row.reference = ppl(cached_collect(ref, held.test[dom], cfg.max_tokens, cache, ("test", dom)).logp_lm)
    if lm.store is None:
        return row
    test_cache = KnnCache.search(lm.store, te, k_max)
    settings = None
    if not cfg.tune:
        settings = {"k": cfg.knn.k, "lmbda": cfg.knn.lmbda, "tau": cfg.knn.tau}
    elif dom in held.val:
        va = cached_collect(lm, held.val[dom], cfg.max_tokens, cache, ("val", dom))
        vcache = KnnCache.search(lm.store, va, k_max)
        sweeps[dom] = tune(vcache, cfg.grid)  # the grid: lambda-sensitivity curves of the research report
        nb = vcache.neighbors()
        fit, _ = fit_fixed(nb, va, cfg.grid.k, distance_scale(nb))
        settings = {"k": fit.k, "lmbda": fit.lmbda, "tau": fit.tau}
        row.val_parametric = ppl(va.logp_lm)
        row.val_knn = ppl(vcache.logp(fit.k, fit.lmbda, fit.tau))
        row.warnings += [f"{dom} (fixed lambda): {w}" for w in fit.warnings]
    else:
        row.reason = f"fixed λ not tuned: {held.missing['val'].get(dom, 'no validation text')}"
    if settings is not None:
        row.knn = ppl(test_cache.logp(settings["k"], settings["lmbda"], settings["tau"]))
        row.knn_settings = settings
        if row.reference is not None and row.parametric - row.reference > 0:
            row.gap_closed = (row.parametric - row.knn) / (row.parametric - row.reference)
    if gate is not None:
        _gated_row(row, lm, gate, te, test_cache)
    return row


def _ric_cells(row: DomainResult, lm: SiloLM, cfg: EvalConfig, texts: list[str], r: str, blocks) -> None:
    rb = ric_collect(lm, texts, cfg.ric.for_retriever(r), blocks, max_positions=cfg.max_tokens)
    row.ric[r] = ppl(rb.logp)
    # the same windows without a block: RIC-LM's own parametric baseline (shorter context)
    row.ric_parametric = ppl(rb.logp_lm)
    row.ric_block_used = float(rb.used_block.mean()) if len(rb.used_block) else 0.0
    if row.reference is not None and row.parametric - row.reference > 0:
        row.ric_gap_closed[r] = (row.parametric - row.ric[r]) / (row.parametric - row.reference)


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
    gcfg = GateConfig(model=cfg.model, store=str(lm.store.path), val=cfg.val, domains=cfg.domains,
                      max_tokens=cfg.max_tokens, keep_overlap=cfg.keep_overlap, overlap_fraction=cfg.overlap_fraction)
    try:
        gate, report = fit_store_gate(gcfg, lm=lm, progress=False, save=False)
    except GateFitError as exc:
        print(f"eval: WARNING: no gated row: {exc}")
        return None, {"source": "fitted on eval.val for this evaluation", "error": str(exc), "warnings": [str(exc)]}
    if progress:
        print(f"eval: fitted a gate on the validation split for this evaluation (not saved): {gate.mode}, k={gate.k}")
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


def _num(v, fmt="{:.2f}"):
    return fmt.format(v) if v is not None else ""


def _pct(v):
    return f"{100 * v:.0f}%" if v is not None else "n/a"


def _columns(out: EvalResult) -> tuple[list[str], dict]:
    """The table's header and which optional column groups it has."""
    rows = out.domains
    has = {"ref": any(r.reference is not None for r in rows), "knn": any(r.knn is not None for r in rows),
           "gate": any(r.knn_gated is not None for r in rows), "skip": any(r.skipped is not None for r in rows),
           "note": any(r.reason for r in rows), "rics": list(dict.fromkeys(name for r in rows for name in r.ric))}
    mode = (out.gate or {}).get("mode", "gated")
    head = ["domain", "tokens", "parametric"]
    if has["knn"]:
        head += ["kNN-LM fixed λ", "k", "λ", "τ"]
    if has["gate"]:
        head += ["kNN-LM gated" if mode == "gated" else f"served ({mode} fallback)", "mean λ"]
        head += ["gated, skipping", "skipped"] if has["skip"] else []
    head += ["reference"] if has["ref"] else []
    if has["knn"] and has["ref"]:
        head += ["gap closed (fixed)"] + (["gap closed (gated)"] if has["gate"] else [])
    for name in has["rics"]:
        head += [f"RIC-LM ({name})"] + ([f"gap closed ({name})"] if has["ref"] else [])
    return head + (["note"] if has["note"] else []), has


def _cells(r: DomainResult, has: dict) -> list[str]:
    cells = [r.domain, str(r.tokens), _num(r.parametric)]
    if has["knn"]:
        s = r.knn_settings or {}
        cells += [_num(r.knn), str(s.get("k", "")), f"{s['lmbda']:.2f}" if s else "", f"{s['tau']:.3g}" if s else ""]
    if has["gate"]:
        cells += [_num(r.knn_gated), _num(r.gated_lambda)]
        cells += [_num(r.knn_gated_skip), _num(r.skipped, "{:.0%}")] if has["skip"] else []
    cells += [_num(r.reference)] if has["ref"] else []
    if has["knn"] and has["ref"]:
        cells += [_pct(r.gap_closed)] + ([_pct(r.gap_closed_gated)] if has["gate"] else [])
    for name in has["rics"]:
        cells += [_num(r.ric.get(name))] + ([_pct(r.ric_gap_closed.get(name))] if has["ref"] else [])
    return cells + ([r.reason or ""] if has["note"] else [])


def markdown_table(out: EvalResult) -> str:
    """The results as a markdown table: one row per domain given (with the reason where it has no
    numbers), then the warnings: boundary choices, the gate's fallback, overlapping documents."""
    head, has = _columns(out)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cells(r, has)) + " |" for r in out.domains]
    gate = out.gate or {}
    notes = [w for r in out.domains for w in r.warnings] + gate.get("warnings", [])
    if gate.get("mode", "gated") != "gated":
        notes.append(f"the store's gate serves a fallback ({gate['mode']}): {gate.get('fallback', '')}")
    notes += [f"{r.domain}: {r.reason}" for r in out.domains if r.reason]
    near = [o for o in out.overlaps if o.get("near_copy", True)]
    few = [o for o in out.overlaps if not o.get("near_copy", True)]
    if near:
        notes.append(f"{len(near)} held-out document(s) are near-copies of store text "
                     f"({'kept' if near[0]['kept'] else 'left out'}): "
                     + ", ".join(f"{o['document_id']} ({o.get('fraction', 1):.0%})" for o in near[:10]))
    if few:
        notes.append(f"{len(few)} held-out document(s) kept that share a few 13-grams with the store: "
                     + ", ".join(f"{o['document_id']} ({o['fraction']:.1%})" for o in few[:10]))
    return "\n".join(lines) + "\n" + "".join(f"\nwarning: {n}" for n in notes) + ("\n" if notes else "")
