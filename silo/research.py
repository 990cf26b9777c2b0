"""The research harness: SILO's risk-performance trade-off in one command (`silo report`).

Built on silo/evaluate.py (same texts, same windows, same tuning on validation) and on in-memory
snapshots of the datastore, so nothing here ever writes to a store except `build-blocks` output:

* sweep    -- kNN-LM (k, lambda, tau) grid on validation from one search at the largest k (KnnCache/tune),
              lambda-sensitivity curves, and RIC-LM block counts (one retrieval at the largest n);
* scaling  -- the evaluation with log-spaced fractions of the store (SILO Figure 3): documents are
              subsampled per shard, deterministically and nested (a document kept at 1/8 is kept at 1/4);
              Flat shards get an in-memory sub-index (exact and BLAS-fast), other index types a
              tombstone view (`Shard.with_removed`);
* opt-out  -- perplexity of an owner's held-out text with and without that owner's shards in the snapshot;
* variants -- parametric-only rows of other LMs (PD / PDSWBY weights, configs/variants.yaml);
* report   -- all of the above into one folder: tables (markdown, JSON, CSV) and PNG plots.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from silo.datastore.blocks import RETRIEVERS, BlockStore, build_blocks
from silo.datastore.store import Datastore, DatastoreError, Shard
from silo.training.config import ConfigError, StageConfig, read_yaml, validate
from silo.training.corpus import load_documents

from .evaluate import EvalConfig, KnnCache, cached_collect, domain_texts, evaluate, ppl, tune
from .lm import SiloLM
from .ric import RICConfig, retrieve_windows, score_windows


class BlocksBuildConfig(StageConfig):
    build_if_missing: bool = True  # cut + index the store's blocks when a shard has none
    block_tokens: int = Field(128, gt=0)
    stride: int = Field(64, gt=0)
    retrievers: list[Literal["bm25", "dense"]] = ["bm25", "dense"]


class SweepConfig(StageConfig):
    ric_blocks: list[int] = [1, 2, 4]  # RIC-LM block counts tried on validation
    ric_ensemble: list[bool] = [False, True]  # concatenated blocks and/or REPLUG ensemble
    max_tokens: int | None = Field(None, gt=0)  # default: eval.max_tokens


class ScalingConfig(StageConfig):
    enabled: bool = True
    fractions: list[float] = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]
    seed: int = 0
    ric_retrievers: list[Literal["bm25", "dense"]] = []  # RIC-LM curves too (each costs a pass per fraction)


class OptoutConfig(StageConfig):
    enabled: bool = True
    owners: list[str] | None = None  # default: every owner with a shard
    max_tokens: int | None = Field(None, gt=0)  # default: eval.max_tokens


class VariantSpec(StageConfig):
    name: str
    model: str


class ResearchConfig(StageConfig):
    output_dir: str = "runs/research"
    blocks: BlocksBuildConfig = BlocksBuildConfig()
    sweep: SweepConfig = SweepConfig()
    scaling: ScalingConfig = ScalingConfig()
    optout: OptoutConfig = OptoutConfig()
    variants: list[VariantSpec] = []  # extra parametric LMs: rows of parametric-only perplexity
    train_variants: bool = False  # train missing variants first (sections of variants_config named like them)
    variants_config: str = "configs/variants.yaml"
    plots: bool = True


def load_research(path: str | Path, eval_overrides: dict | None = None,
                  overrides: dict | None = None) -> tuple[EvalConfig, ResearchConfig]:
    """The `eval` section (required) and the `research` section (optional) of a YAML file."""
    data = read_yaml(path)
    if "eval" not in data:
        raise ConfigError(f"{path}: missing section 'eval' (sections present: {', '.join(data) or 'none'})")
    ev = validate(EvalConfig, {**(data["eval"] or {}), **(eval_overrides or {})}, prefix="eval", source=str(path))
    rc = validate(ResearchConfig, {**(data.get("research") or {}), **(overrides or {})}, prefix="research",
                  source=str(path))
    if not ev.store:
        raise ConfigError(f"{path}: eval.store is required for the research harness")
    bad = [f for f in rc.scaling.fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"{path}: research.scaling.fractions must lie in (0, 1] (got {bad})")
    if any(n < 1 for n in rc.sweep.ric_blocks):
        raise ConfigError(f"{path}: research.sweep.ric_blocks must be >= 1 (got {rc.sweep.ric_blocks})")
    return ev, rc


# ------------------------------------------------------------------------------------------ blocks

def ensure_blocks(store_path: str | Path, tokenizer, rc: ResearchConfig, progress: bool = True) -> bool:
    """Build the store's RIC blocks when a shard lacks them (or an index); True if something was built."""
    store = Datastore.open(store_path)
    try:
        bs = BlockStore(store)
        missing = [r for r in rc.blocks.retrievers if r not in bs.retrievers()]
    except DatastoreError:
        missing = list(rc.blocks.retrievers)
    if not missing:
        return False
    if not rc.blocks.build_if_missing:
        raise DatastoreError(f"{store_path}: no RIC blocks with {missing}; run `silo datastore build-blocks "
                             f"--store {store_path}` or set research.blocks.build_if_missing: true")
    build_blocks(store_path, tokenizer, rc.blocks.block_tokens, rc.blocks.stride, rc.blocks.retrievers,
                 progress=progress)
    return True


# ------------------------------------------------------------------------------------------ snapshots

def _rank(seed: int, shard: str, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{shard}\0{doc_id}".encode()).hexdigest()


def subsample(store: Datastore, fraction: float, seed: int = 0) -> Datastore:
    """An in-memory snapshot holding about `fraction` of each shard's live documents (never written).

    Documents are ranked per shard by a seeded hash of their id and the first ceil(fraction * n) kept,
    so subsets are nested across fractions and identical across runs.
    """
    if fraction >= 1:
        return store
    nprobe = store.manifest["index"].get("nprobe", 16)
    shards = []
    for s in store.shards:
        live = [i for i in range(len(s.documents)) if i not in s.removed_docs]
        if not live:
            shards.append(s)
            continue
        order = sorted(live, key=lambda i: _rank(seed, s.name, s.documents[i]["id"]))
        keep = set(order[:max(1, math.ceil(fraction * len(order)))])
        dropped = frozenset(s.removed_docs | (set(live) - keep))
        shards.append(_flat_subset(s, keep, dropped) or s.with_removed(dropped, nprobe))
    return Datastore(path=store.path, manifest=store.manifest, shards=shards, device=store.device)


def _flat_subset(s: Shard, keep: set[int], dropped: frozenset[int]) -> Shard | None:
    """For a Flat shard, a smaller exact index of the kept rows (searching a tombstone view of a Flat
    index goes through a per-id selector and loses the BLAS path: many times slower)."""
    index = faiss.downcast_index(s.index)
    if not isinstance(index, faiss.IndexFlat) or s.index.metric_type != faiss.METRIC_L2:
        return None
    rows = np.flatnonzero(np.isin(s.entries["doc"], np.fromiter(keep, dtype=np.int64)))
    xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    sub = faiss.IndexFlatL2(index.d)
    for i in range(0, len(rows), 65536):
        sub.add(np.ascontiguousarray(xb[rows[i:i + 65536]]))
    view = Shard(s.name, s.owner, s.dir, sub, np.asarray(s.entries[rows]), s.documents, dropped)
    view.live_entries = len(rows)
    return view


def without_owners(store: Datastore, owners: set[str]) -> Datastore:
    """An in-memory snapshot without the shards of `owners` (the store on disk is untouched)."""
    return Datastore(path=store.path, manifest=store.manifest, device=store.device,
                     shards=[s for s in store.shards if s.owner not in owners])


def _live_documents(store: Datastore) -> int:
    return sum(len(s.documents) - len(s.removed_docs) for s in store.shards)


# ------------------------------------------------------------------------------------------ sweep

def lambda_curves(knn_sweeps: dict) -> dict:
    """Per domain: validation perplexity against lambda, best (k, tau) for each lambda."""
    out = {}
    for dom, sw in knn_sweeps.items():
        by = {}
        for r in sw["rows"]:
            if r["lmbda"] not in by or r["val_ppl"] < by[r["lmbda"]]["val_ppl"]:
                by[r["lmbda"]] = r
        out[dom] = [{"lmbda": lam, "val_ppl": by[lam]["val_ppl"], "k": by[lam]["k"],
                     "temperature": by[lam]["temperature"]} for lam in sorted(by)]
    return out


def ric_sweep(lm: SiloLM, ev: EvalConfig, rc: ResearchConfig, blocks: BlockStore, val: dict,
              progress: bool = True) -> dict:
    """Validation perplexity of RIC-LM per domain, retriever, block count and ensemble flag."""
    n_max = max(rc.sweep.ric_blocks)
    cap = rc.sweep.max_tokens or ev.max_tokens
    out = {}
    retrievers = [r for r in ev.ric.retrievers if r in blocks.retrievers()]
    combos = [(d, r) for d in val for r in retrievers]
    for dom, r in tqdm(combos, desc="sweep: RIC-LM", unit="run", disable=not progress or None):
        cfg = ev.ric.for_retriever(r)
        jobs, ids, hits = retrieve_windows(lm, val[dom], cfg, blocks, n_max, max_positions=cap)  # one retrieval
        for n in rc.sweep.ric_blocks:
            for ens in rc.sweep.ric_ensemble:
                if ens and n == 1:
                    continue  # an ensemble of one block is the concatenation of one block
                rb = score_windows(lm, cfg, jobs, ids, hits, n, ens, blocks).truncate(cap)
                out.setdefault(dom, []).append({"retriever": r, "n_blocks": n, "ensemble": ens,
                                                "val_ppl": ppl(rb.logp), "val_parametric": ppl(rb.logp_lm)})
    return out


def sweep(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM | None = None, cache: dict | None = None,
          progress: bool = True, knn_sweeps: dict | None = None) -> dict:
    """kNN-LM grid + lambda curves + RIC-LM block counts on validation; best settings per domain."""
    lm = lm or SiloLM.load(ev.model, ev.store, knn=ev.knn, window=ev.window, stride=ev.stride)
    cap = rc.sweep.max_tokens or ev.max_tokens
    val = domain_texts(load_documents(ev.val, ev.domains), cap)
    if knn_sweeps is None:
        knn_sweeps = {}
        k_max = max(ev.grid.k)
        for dom in tqdm(list(val), desc="sweep: kNN-LM", unit="domain", disable=not progress or None):
            va = cached_collect(lm, val[dom], cap, cache, ("val", dom))
            vnb = lm.store.search(va.keys, k_max)
            scale = float(np.median(vnb.distances[:, 0][np.isfinite(vnb.distances[:, 0])])) or 1.0
            _, rows = tune(KnnCache(va.logp_lm, va.targets, vnb.distances, vnb.tokens), ev.grid, scale)
            knn_sweeps[dom] = {"distance_scale": scale, "rows": rows}
    curves = lambda_curves(knn_sweeps)
    blocks = _blocks_or_none(lm, ev)
    ric = ric_sweep(lm, ev, rc, blocks, val, progress) if blocks is not None else {}
    best = {}
    for dom, sw in knn_sweeps.items():
        b = min(sw["rows"], key=lambda r: r["val_ppl"])
        best[dom] = {"knn": {k: b[k] for k in ("k", "lmbda", "temperature", "val_ppl")}}
        if dom in ric:
            rb = {}
            for r in ric[dom]:
                if r["retriever"] not in rb or r["val_ppl"] < rb[r["retriever"]]["val_ppl"]:
                    rb[r["retriever"]] = r
            best[dom]["ric"] = rb
    return {"knn": knn_sweeps, "lambda_curves": curves, "ric": ric, "best": best, "max_tokens": cap}


def _blocks_or_none(lm: SiloLM, ev: EvalConfig) -> BlockStore | None:
    if lm.store is None or ev.ric.enabled is False:
        return None
    try:
        return BlockStore(lm.store, ev.ric.dense_model)
    except DatastoreError:
        if ev.ric.enabled is True:
            raise
        return None


# ------------------------------------------------------------------------------------------ scaling

def scaling(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM, ref: SiloLM | None = None, cache: dict | None = None,
            progress: bool = True, full: dict | None = None) -> dict:
    """The evaluation (kNN-LM tuned on validation, optional RIC-LM) on growing fractions of the store."""
    store = lm.store
    if store is None:
        raise DatastoreError("scaling needs eval.store")
    ric_on = bool(rc.scaling.ric_retrievers)
    sub_ev = ev.model_copy(update={"ric": ev.ric.model_copy(update={
        "retrievers": list(rc.scaling.ric_retrievers), "enabled": True if ric_on else False})})
    total_entries, total_docs = store.num_entries, _live_documents(store)
    rows = []
    try:
        for frac in tqdm(sorted(set(rc.scaling.fractions)), desc="scaling", unit="fraction", disable=not progress or None):
            snap = subsample(store, frac, rc.scaling.seed)
            if frac >= 1 and full is not None and (not ric_on or all(
                    r in d.get("ric", {}) for d in full["domains"] for r in rc.scaling.ric_retrievers)):
                res = full  # the full store was just evaluated with the same settings
            else:
                lm.swap_store(snap)
                res = evaluate(sub_ev, progress=False, lm=lm, ref=ref, cache=cache, write=False)
            doms = {}
            for d in res["domains"]:
                doms[d["domain"]] = {"knn": d.get("knn"), "knn_settings": d.get("knn_settings"),
                                     "parametric": d["parametric"], "reference": d.get("reference"),
                                     **{f"ric_{r}": v for r, v in d.get("ric", {}).items()
                                        if r in rc.scaling.ric_retrievers}}
            rows.append({"fraction": frac, "entries": snap.num_entries, "entries_share": snap.num_entries / max(1, total_entries),
                         "documents": _live_documents(snap), "documents_share": _live_documents(snap) / max(1, total_docs),
                         "domains": doms})
    finally:
        lm.swap_store(store)
    return {"seed": rc.scaling.seed, "total_entries": total_entries, "total_documents": total_docs, "rows": rows}


# ------------------------------------------------------------------------------------------ opt-out

def optout(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM, cache: dict | None = None, progress: bool = True,
           full: dict | None = None) -> dict:
    """Per owner: perplexity of their held-out text with and without their shards in the store."""
    store = lm.store
    if store is None:
        raise DatastoreError("opt-out needs eval.store")
    owners = rc.optout.owners or list(dict.fromkeys(s.owner for s in store.shards if s.owner))
    unknown = [o for o in owners if o not in {s.owner for s in store.shards}]
    if unknown:
        raise ConfigError(f"research.optout.owners: no shard belongs to {unknown}; owners in the store: "
                          f"{sorted({s.owner for s in store.shards})}")
    cap = rc.optout.max_tokens or ev.max_tokens
    test_docs = load_documents(ev.test, ev.domains)
    settings = {d["domain"]: d["knn_settings"] for d in (full or {}).get("domains", []) if "knn_settings" in d}
    blocks = _blocks_or_none(lm, ev)
    retriever = next((r for r in ev.ric.retrievers if blocks is not None and r in blocks.retrievers()), None)
    rows = []
    for owner in tqdm(owners, desc="opt-out", unit="owner", disable=not progress or None):
        docs = [d for d in test_docs if d.owner == owner]
        if not docs:
            rows.append({"owner": owner, "tokens": 0, "note": "no held-out text of this owner in eval.test"})
            continue
        texts = [t for ts in domain_texts(docs, cap).values() for t in ts]
        domain = max({d.domain for d in docs}, key=lambda x: sum(len(d.text) for d in docs if d.domain == x))
        s = settings.get(domain) or {"k": ev.knn.k, "lmbda": ev.knn.lmbda, "temperature": ev.knn.temperature}
        pos = cached_collect(lm, texts, cap, cache, ("optout", owner))
        snap = without_owners(store, {owner})
        row = {"owner": owner, "domain": domain, "tokens": int(len(pos.targets)), "parametric": ppl(pos.logp_lm),
               "knn_settings": s, "entries_removed": store.num_entries - snap.num_entries,
               "shards_removed": [x.name for x in store.shards if x.owner == owner]}
        for tag, st in (("with", store), ("without", snap)):
            if st.num_entries == 0:
                row[f"knn_{tag}"] = row["parametric"]  # an empty store contributes nothing
                continue
            nb = st.search(pos.keys, s["k"])
            row[f"knn_{tag}"] = ppl(KnnCache(pos.logp_lm, pos.targets, nb.distances, nb.tokens)
                                    .logp(s["k"], s["lmbda"], s["temperature"]))
        if retriever is not None:
            cfg = ev.ric.for_retriever(retriever)
            row["ric_retriever"] = retriever
            for tag, st in (("with", store), ("without", snap)):
                bs = BlockStore(st, ev.ric.dense_model)
                jobs, ids, hits = retrieve_windows(lm, texts, cfg, bs, cfg.n_blocks, max_positions=cap)
                rb = score_windows(lm, cfg, jobs, ids, hits, cfg.n_blocks, cfg.ensemble, bs).truncate(cap)
                row[f"ric_{tag}"] = ppl(rb.logp)
                row["ric_parametric"] = ppl(rb.logp_lm)
                row[f"ric_{tag}_owner_blocks"] = sum(h.owner == owner for hs in hits for h in hs)
        rows.append(row)
    return {"rows": rows}


# ------------------------------------------------------------------------------------------ variants

def variant_rows(ev: EvalConfig, rc: ResearchConfig, base: SiloLM, cache: dict | None = None,
                 progress: bool = True) -> dict:
    """Parametric-only test perplexity per domain of each extra LM; missing models are listed, not fatal."""
    from silo.datastore.blocks import tokenizer_sha256

    test = domain_texts(load_documents(ev.test, ev.domains), ev.max_tokens)
    out, skipped = {}, []
    if rc.train_variants:
        _train_missing_variants(rc, progress)
    for v in tqdm(rc.variants, desc="variants", unit="model", disable=not progress or None):
        if not (Path(v.model) / "config.json").exists():
            skipped.append({"name": v.name, "model": v.model, "why": "not trained (no config.json); "
                            f"`silo train --config {rc.variants_config} --section {v.name.lower()}`"})
            continue
        vlm = SiloLM.load(v.model, window=ev.window, stride=ev.stride)
        row = {"model": v.model, "same_tokenizer": tokenizer_sha256(vlm.tokenizer) == tokenizer_sha256(base.tokenizer),
               "domains": {}}
        for dom, texts in test.items():
            pos = cached_collect(vlm, texts, ev.max_tokens, cache, ("test", dom))
            row["domains"][dom] = ppl(pos.logp_lm)
        try:
            prov = json.loads((Path(v.model) / "provenance.json").read_text())
            row["policy"] = prov.get("policy", {})
        except (OSError, json.JSONDecodeError):
            pass
        out[v.name] = row
    return {"variants": out, "skipped": skipped}


def _train_missing_variants(rc: ResearchConfig, progress: bool) -> None:
    from silo.training.config import load_section
    from silo.training.train import TrainConfig, train

    data = read_yaml(rc.variants_config)
    for v in rc.variants:
        section = v.name.lower()
        if (Path(v.model) / "config.json").exists():
            continue
        if section not in data:
            raise ConfigError(f"{rc.variants_config}: no section '{section}' to train variant {v.name}")
        cfg = load_section(rc.variants_config, section, TrainConfig, {"output_dir": v.model})
        train(cfg, config_source=f"{rc.variants_config}#{section}", progress=progress)


# ------------------------------------------------------------------------------------------ tables

def write_table(out_dir: Path, name: str, rows: list[dict], title: str = "", floatfmt: str = "{:.2f}") -> str:
    """rows (flat dicts) -> NAME.csv, NAME.json, NAME.md; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    md = (f"### {title}\n\n" if title else "") + "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    md += "".join("| " + " | ".join(cell(r.get(k)) for k in cols) + " |\n" for r in rows)
    (out_dir / f"{name}.md").write_text(md)
    return md


def _pct(x):
    return None if x is None else f"{100 * x:.0f}%"


def main_rows(res: dict, variants: dict | None = None) -> list[dict]:
    """One row per domain: every method's test perplexity and each method's share of the gap closed."""
    rows = []
    for d in res["domains"]:
        r = {"domain": d["domain"], "tokens": d["tokens"], "parametric": d["parametric"]}
        if "knn" in d:
            r["kNN-LM"] = d["knn"]
        for name, v in d.get("ric", {}).items():
            r[f"RIC-LM ({name})"] = v
        if "ric_parametric" in d:
            r["parametric (RIC windows)"] = d["ric_parametric"]
        for vname, v in ((variants or {}).get("variants") or {}).items():
            r[f"{vname} (parametric)"] = v["domains"].get(d["domain"])
        if "reference" in d:
            r["reference"] = d["reference"]
        if "gap_closed" in d:
            r["gap closed kNN-LM"] = _pct(d["gap_closed"])
        for name, g in d.get("ric_gap_closed", {}).items():
            r[f"gap closed RIC-LM ({name})"] = _pct(g)
        if "knn_settings" in d:
            s = d["knn_settings"]
            r["kNN k/λ/τ"] = f"{s['k']}/{s['lmbda']:.2f}/{s['temperature']:.3g}"
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------ plots

def plot_domains(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in rows[0] if k not in ("domain", "tokens", "kNN k/λ/τ") and not k.startswith("gap closed")]
    methods = [m for m in methods if any(isinstance(r.get(m), (int, float)) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) * max(1, len(methods)) / 3), 4.2))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(rows))
    for i, m in enumerate(methods):
        vals = [r.get(m) if isinstance(r.get(m), (int, float)) else np.nan for r in rows]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [r["domain"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title("Perplexity per domain and method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(sc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(sc["rows"][0]["domains"]) if sc["rows"] else []
    fig, axes = plt.subplots(1, max(1, len(doms)), figsize=(3.6 * max(1, len(doms)), 3.4), squeeze=False)
    xs = [r["entries_share"] for r in sc["rows"]]
    for ax, dom in zip(axes[0], doms):
        per = [r["domains"].get(dom, {}) for r in sc["rows"]]
        ax.plot(xs, [p.get("knn") for p in per], "o-", label="kNN-LM")
        for key in sorted({k for p in per for k in p if k.startswith("ric_")}):
            ax.plot(xs, [p.get(key) for p in per], "s--", label=f"RIC-LM ({key[4:]})")
        ax.axhline(per[-1]["parametric"], color="gray", ls=":", label="parametric")
        if per[-1].get("reference"):
            ax.axhline(per[-1]["reference"], color="black", ls="-.", label="reference")
        ax.set_xscale("log", base=2)
        ax.set_title(dom)
        ax.set_xlabel("share of datastore entries")
        ax.set_ylabel("test perplexity")
    if doms:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Datastore scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for dom, pts in curves.items():
        base = pts[0]["val_ppl"] if pts and pts[0]["lmbda"] == 0 else 1.0
        ax.plot([p["lmbda"] for p in pts], [p["val_ppl"] / base for p in pts], "o-", label=dom)
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xlabel("λ (weight of the kNN distribution)")
    ax.set_ylabel("validation perplexity / parametric")
    ax.set_title("kNN-LM λ sensitivity (best k, τ per λ)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ report

def report(ev: EvalConfig, rc: ResearchConfig, progress: bool = True) -> dict:
    """Everything into rc.output_dir: results/sweep/scaling/optout/variants tables, PNG plots, report.md."""
    t0 = time.time()
    out = Path(rc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm = SiloLM.load(ev.model, None, knn=ev.knn, window=ev.window, stride=ev.stride)
    if ev.ric.enabled is not False:
        ensure_blocks(ev.store, lm.tokenizer, rc, progress)
    lm.swap_store(Datastore.open(ev.store, fingerprint=lm.fingerprint))
    ref = SiloLM.load(ev.reference_model, window=ev.window, stride=ev.stride) if ev.reference_model else None
    cache: dict = {}
    steps = tqdm(total=6, desc="report", unit="step", disable=not progress or None)

    res = evaluate(ev, progress=progress, lm=lm, ref=ref, cache=cache, write=False)
    knn_sweeps = res.pop("_sweeps")
    steps.update()
    sw = sweep(ev, rc, lm, cache, progress, knn_sweeps=knn_sweeps if not rc.sweep.max_tokens else None)
    steps.update()
    sc = scaling(ev, rc, lm, ref, cache, progress, full=res) if rc.scaling.enabled else None
    steps.update()
    oo = optout(ev, rc, lm, cache, progress, full=res) if rc.optout.enabled else None
    steps.update()
    va = variant_rows(ev, rc, lm, cache, progress) if rc.variants else {"variants": {}, "skipped": []}
    steps.update()

    md = [f"# SILO research report\n\nmodel `{ev.model}`, store `{ev.store}` ({res['store_entries']:,} entries), "
          f"reference `{ev.reference_model}`; up to {ev.max_tokens} scored test tokens per domain; "
          f"windows {res['window']}/{res['stride']}"]
    if "ric" in res:
        r = res["ric"]
        md[0] += (f"; RIC-LM windows {r['window']}/{r['stride']} with {r['n_blocks']} block(s) of "
                  f"{r['block_tokens']} tokens ({r['blocks']:,} blocks)")
    md[0] += ".\n"
    rows = main_rows(res, va)
    md.append(write_table(out, "results", rows, "Test perplexity per domain (kNN-LM tuned on validation)"))
    (out / "results_full.json").write_text(json.dumps(res, indent=1))
    best_rows = []
    for dom, b in sw["best"].items():
        row = {"domain": dom, "k": b["knn"]["k"], "λ": b["knn"]["lmbda"], "τ": b["knn"]["temperature"],
               "val kNN-LM": b["knn"]["val_ppl"]}
        for name, rb in b.get("ric", {}).items():
            row[f"RIC ({name}) blocks"] = f"{rb['n_blocks']}{' ens' if rb['ensemble'] else ''}"
            row[f"val RIC ({name})"] = rb["val_ppl"]
        best_rows.append(row)
    md.append(write_table(out, "sweep_best", best_rows, "Best settings on validation"))
    ric_rows = [{"domain": d, **r} for d, rs in sw["ric"].items() for r in rs]
    if ric_rows:
        md.append(write_table(out, "sweep_ric", ric_rows, "RIC-LM block count on validation"))
    lam_rows = [{"domain": d, **p} for d, pts in sw["lambda_curves"].items() for p in pts]
    write_table(out, "sweep_lambda", lam_rows, "λ sensitivity (best k, τ per λ; validation)")
    (out / "sweep.json").write_text(json.dumps(sw, indent=1))
    plots = {}
    if rc.plots and lam_rows:
        plot_lambda(sw["lambda_curves"], out / "lambda_sensitivity.png")
        plots["lambda_sensitivity.png"] = "validation perplexity (relative to λ=0) against λ, per domain"
    if rc.plots and rows:
        plot_domains(rows, out / "perplexity_by_domain.png")
        plots["perplexity_by_domain.png"] = "test perplexity per domain and method"
    if sc is not None:
        flat = [{"fraction": r["fraction"], "entries": r["entries"], "documents": r["documents"], "domain": dom, **{
            k: v for k, v in vals.items() if k != "knn_settings"}} for r in sc["rows"] for dom, vals in r["domains"].items()]
        md.append(write_table(out, "scaling", flat, "Datastore scaling (test perplexity)"))
        (out / "scaling_rows.json").write_text(json.dumps(sc, indent=1))
        if rc.plots and sc["rows"]:
            plot_scaling(sc, out / "scaling.png")
            plots["scaling.png"] = "test perplexity against the share of the datastore"
    if oo is not None:
        flat = [{k: (v if not isinstance(v, (dict, list)) else json.dumps(v)) for k, v in r.items()} for r in oo["rows"]]
        md.append(write_table(out, "optout", flat, "Opt-out: an owner's held-out text with and without their shards"))
    if va["skipped"]:
        md.append("Variants not trained (rows left out): " + "; ".join(f"{s['name']} ({s['why']})" for s in va["skipped"]) + "\n")
    (out / "variants.json").write_text(json.dumps(va, indent=1))
    md.append("## Plots\n\n" + "".join(f"![{k}]({k}) {v}\n\n" for k, v in plots.items()))
    md.append(f"_{time.time() - t0:.0f}s_\n")
    (out / "report.md").write_text("\n".join(md))
    steps.update()
    steps.close()
    return {"output_dir": str(out), "results": res, "rows": rows, "sweep": sw, "scaling": sc, "optout": oo,
            "variants": va, "plots": sorted(plots), "seconds": round(time.time() - t0, 1)}


__all__ = ["ResearchConfig", "load_research", "report", "sweep", "scaling", "optout", "subsample",
           "without_owners", "ensure_blocks", "variant_rows", "RETRIEVERS", "RICConfig"]
