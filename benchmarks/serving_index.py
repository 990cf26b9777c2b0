"""Is the served index good enough? recall@k against exact search and test perplexity, per nprobe (not a test).

    python benchmarks/serving_index.py --store runs/demo/store --nprobe 8,16,32,64 --k 1024

For each nprobe: recall@1/10/k of the store's own search against exact search over the shards' stored
keys (queries: the model's keys of test text, what a served query looks like), queries per second (one
query at a time, as generation searches), and test perplexity per domain under the store's served mixture
(its fitted gate) next to parametric-only. The served index qualifies when recall@k >= 0.9 and every
domain's perplexity is within 2% of exact search: a flat index over each shard's stored keys (keys.npy),
so a quantised index (SQ, PQ) is judged against exact distances too; the nprobe that visits every list is
shown as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--model", help="default: the manifest's model path")
    ap.add_argument("--test", nargs="+", default=["pkg:demo/test"])
    ap.add_argument("--nprobe", default="8,16,32", help="comma-separated nprobe values to compare")
    ap.add_argument("--k", type=int, default=1024, help="recall@k (the gate's k)")
    ap.add_argument("--max-tokens", type=int, default=2000, help="test tokens per domain")
    ap.add_argument("--queries", type=int, default=256)
    args = ap.parse_args(argv)

    from silo.core.corpus import load_documents
    from silo.datastore.format import Manifest
    from silo.datastore.reindex import index_recall
    from silo.datastore.store import Datastore
    from silo.model.lm import SiloLM
    from silo.workflows.tuning import domain_texts

    manifest = Manifest.read(args.store)
    lm = SiloLM.load(args.model or manifest.model.path, args.store)
    texts = domain_texts(load_documents(args.test), args.max_tokens)
    pos = lm.collect([t for ts in texts.values() for t in ts])
    rng = np.random.default_rng(0)
    q = pos.keys[np.sort(rng.choice(len(pos.keys), min(args.queries, len(pos.keys)), replace=False))]
    nlist = max(getattr(s.index, "nlist", 0) for s in lm.store.shards)
    probes = [int(x) for x in args.nprobe.split(",")] + ([nlist] if nlist else []) + ["exact"]
    rows = []
    for nprobe in probes:
        store = Datastore.open(args.store, fingerprint=lm.fingerprint)
        if nprobe == "exact":  # flat over the stored keys: exact distances whatever the index type
            store.shards = [dataclasses.replace(s, index=_flat(s)).with_removed(s.removed_docs, 1) for s in store.shards]
        else:
            store.manifest.index.nprobe = nprobe
            store.shards = [s.with_removed(s.removed_docs, nprobe) for s in store.shards]
        rec = index_recall(store, q, (1, 10, args.k))
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 2.0:
            store.search(q[n % len(q)][None], args.k)
            n += 1
        qps = n / (time.perf_counter() - t0)
        lm.swap_store(store)  # same generation, other nprobe (the gate is read again for it)
        ppl = {}
        for dom, ts in texts.items():
            res = lm.score(ts, lm.retriever("knn"))
            ppl[dom] = (math.exp(-np.concatenate([r.logp for r in res]).mean()),
                        math.exp(-np.concatenate([r.logp_parametric for r in res]).mean()))
        rows.append((nprobe, rec, qps, ppl))
        print(f"nprobe {nprobe}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()) + f"; {qps:.0f} queries/s; "
              + "; ".join(f"{d} {p:.2f}" for d, (p, _) in ppl.items()), flush=True)
    exact = rows[-1][3]
    print(f"\n| nprobe | recall@1 | recall@10 | recall@{args.k} | queries/s | "
          + " | ".join(f"{d} ppl (vs exact)" for d in exact) + " |")
    print("|---" * (5 + len(exact)) + "|")
    for nprobe, rec, qps, ppl in rows:
        cells = [f"{ppl[d][0]:.2f} ({100 * (ppl[d][0] / exact[d][0] - 1):+.2f}%)" for d in exact]
        print(f"| {nprobe}{' (all lists)' if nprobe == nlist else ''}{' (flat over keys.npy)' if nprobe == 'exact' else ''} | "
              + " | ".join(f"{v:.3f}" for v in rec.values()) + f" | {qps:.0f} | " + " | ".join(cells) + " |")
    print("parametric: " + "; ".join(f"{d} {p[1]:.2f}" for d, p in exact.items()))
    return 0


def _flat(shard):
    import faiss

    from silo.datastore.keys_store import open_keys

    keys = np.asarray(open_keys(shard.dir), dtype=np.float32)
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    return flat


if __name__ == "__main__":
    sys.exit(main())
