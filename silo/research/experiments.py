"""The research harness's experiments (SILO's risk-performance trade-off), built on the evaluation
(same texts, same windows, same tuning on validation) and on in-memory snapshots of the datastore, so
nothing here writes to a store except `build-blocks` output:

* sweep        -- kNN-LM (k, lambda, tau) grid on validation from one search at the largest k, lambda-
                  sensitivity curves, and RIC-LM block counts (one retrieval at the largest n);
* scaling      -- the evaluation with log-spaced fractions of the store (SILO Figure 3; `snapshots.subsample`);
* owner effect -- perplexity of an owner's held-out text with and without that owner's shards;
* variants     -- parametric-only rows of other LMs (PD / PDSWBY weights, configs/variants.yaml).

`report.py` puts them into one folder of tables and plots.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from silo.core.config import ConfigError, read_yaml
from silo.core.corpus import load_documents
from silo.datastore.blocks import BlockStore, build_blocks
from silo.datastore.store import Datastore, DatastoreError
from silo.model.lm import SiloLM
from silo.model.ric import retrieve_windows, score_windows
from silo.workflows.evaluate import EvalConfig, EvalResult, cached_collect, domain_texts, evaluate, open_blocks
from silo.workflows.tuning import KnnCache, Sweep, ppl, tune

from .config import ResearchConfig
from .snapshots import live_document_count, subsample, without_owners


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


def lambda_curves(knn_sweeps: dict[str, Sweep]) -> dict:
    """Per domain: validation perplexity against lambda, best (k, tau) for each lambda."""
    out = {}
    for dom, sw in knn_sweeps.items():
        by = {}
        for r in sw.rows:
            if r["lmbda"] not in by or r["val_ppl"] < by[r["lmbda"]]["val_ppl"]:
                by[r["lmbda"]] = r
        out[dom] = [{"lmbda": lam, "val_ppl": by[lam]["val_ppl"], "k": by[lam]["k"],
                     "tau": by[lam]["tau"]} for lam in sorted(by)]
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
          progress: bool = True, knn_sweeps: dict[str, Sweep] | None = None) -> dict:
    """kNN-LM grid + lambda curves + RIC-LM block counts on validation; best settings per domain."""
    lm = lm or SiloLM.load(ev.model, ev.store, knn=ev.knn, window=ev.window, stride=ev.stride)
    cap = rc.sweep.max_tokens or ev.max_tokens
    val = domain_texts(load_documents(ev.val, ev.domains), cap)
    if knn_sweeps is None:
        knn_sweeps = {}
        k_max = max(ev.grid.k)
        for dom in tqdm(list(val), desc="sweep: kNN-LM", unit="domain", disable=not progress or None):
            va = cached_collect(lm, val[dom], cap, cache, ("val", dom))
            knn_sweeps[dom] = tune(KnnCache.search(lm.store, va, k_max), ev.grid)
    curves = lambda_curves(knn_sweeps)
    blocks = open_blocks(ev, lm)
    ric = ric_sweep(lm, ev, rc, blocks, val, progress) if blocks is not None else {}
    best = {}
    for dom, sw in knn_sweeps.items():
        b = sw.best
        best[dom] = {"knn": {k: b[k] for k in ("k", "lmbda", "tau", "val_ppl")}}
        if dom in ric:
            rb = {}
            for r in ric[dom]:
                if r["retriever"] not in rb or r["val_ppl"] < rb[r["retriever"]]["val_ppl"]:
                    rb[r["retriever"]] = r
            best[dom]["ric"] = rb
    return {"knn": {d: s.to_json() for d, s in knn_sweeps.items()}, "lambda_curves": curves, "ric": ric,
            "best": best, "max_tokens": cap}


# ------------------------------------------------------------------------------------------ scaling

def scaling(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM, ref: SiloLM | None = None, cache: dict | None = None,
            progress: bool = True, full: EvalResult | None = None) -> dict:
    """The evaluation (kNN-LM tuned on validation, optional RIC-LM) on growing fractions of the store."""
    store = lm.store
    if store is None:
        raise DatastoreError("scaling needs eval.store")
    ric_on = bool(rc.scaling.ric_retrievers)
    sub_ev = ev.model_copy(update={"ric": ev.ric.model_copy(update={
        "retrievers": list(rc.scaling.ric_retrievers), "enabled": True if ric_on else False})})
    total_entries, total_docs = store.num_entries, live_document_count(store)
    rows = []
    try:
        for frac in tqdm(sorted(set(rc.scaling.fractions)), desc="scaling", unit="fraction", disable=not progress or None):
            snap = subsample(store, frac, rc.scaling.seed)
            if frac >= 1 and full is not None and (not ric_on or all(
                    r in d.ric for d in full.domains for r in rc.scaling.ric_retrievers)):
                res = full  # the full store was just evaluated with the same settings
            else:
                lm.swap_store(snap)
                res = evaluate(sub_ev, progress=False, lm=lm, ref=ref, cache=cache, write=False)
            doms = {}
            for d in res.domains:
                doms[d.domain] = {"knn": d.knn, "knn_settings": d.knn_settings, "parametric": d.parametric,
                                  "reference": d.reference,
                                  **{f"ric_{r}": v for r, v in d.ric.items() if r in rc.scaling.ric_retrievers}}
            rows.append({"fraction": frac, "entries": snap.num_entries, "entries_share": snap.num_entries / max(1, total_entries),
                         "documents": live_document_count(snap), "documents_share": live_document_count(snap) / max(1, total_docs),
                         "domains": doms})
    finally:
        lm.swap_store(store)
    return {"seed": rc.scaling.seed, "total_entries": total_entries, "total_documents": total_docs, "rows": rows}


# ------------------------------------------------------------------------------------------ owner effect

def owner_effect(ev: EvalConfig, rc: ResearchConfig, lm: SiloLM, cache: dict | None = None, progress: bool = True,
                 full: EvalResult | None = None) -> dict:
    """Per owner: perplexity of their held-out text with and without their shards in the store."""
    store = lm.store
    if store is None:
        raise DatastoreError("the opt-out effect needs eval.store")
    owners = rc.owner_effect.owners or list(dict.fromkeys(s.owner for s in store.shards if s.owner))
    unknown = [o for o in owners if o not in {s.owner for s in store.shards}]
    if unknown:
        raise ConfigError(f"research.owner_effect.owners: no shard belongs to {unknown}; owners in the store: "
                          f"{sorted({s.owner for s in store.shards})}")
    cap = rc.owner_effect.max_tokens or ev.max_tokens
    test_docs = load_documents(ev.test, ev.domains)
    settings = {d.domain: d.knn_settings for d in (full.domains if full else []) if d.knn_settings}
    blocks = open_blocks(ev, lm)
    retriever = next((r for r in ev.ric.retrievers if blocks is not None and r in blocks.retrievers()), None)
    rows = []
    for owner in tqdm(owners, desc="opt-out", unit="owner", disable=not progress or None):
        docs = [d for d in test_docs if d.owner == owner]
        if not docs:
            rows.append({"owner": owner, "tokens": 0, "note": "no held-out text of this owner in eval.test"})
            continue
        texts = [t for ts in domain_texts(docs, cap).values() for t in ts]
        domain = max({d.domain for d in docs}, key=lambda x: sum(len(d.text) for d in docs if d.domain == x))
        s = settings.get(domain) or {"k": ev.knn.k, "lmbda": ev.knn.lmbda, "tau": ev.knn.tau}
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
                                    .logp(s["k"], s["lmbda"], s["tau"]))
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
    from silo.core.config import load_section
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
