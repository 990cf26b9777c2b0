"""kNN-LM throughput ratios, measured side by side in one run (not a test: timings are noisy).

Prints, for the demo model and store (run `bash scripts/demo.sh` first):
  * scoring throughput kNN-LM / parametric-only (same texts, same windows);
  * datastore build throughput / pure forward throughput (keys per second vs tokens per second);
  * bytes per entry on disk;
and the same scoring ratio against a store of >= 1M entries (flat and IVF-PQ), made by tiling the demo
store's real keys with small noise into the real on-disk format (so search cost is realistic while
the build takes seconds, not the minutes a 1M-token encode would).

    .venv/bin/python benchmarks/knn_bench.py [--model runs/demo/model] [--store runs/demo/store]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from silo.datastore.keys import KeyExtractor
from silo.core.corpus import load_documents
from silo.datastore.format import ENTRY_DTYPE, IndexRef, ShardRecord, StoredDocument
from silo.datastore.shard import write_shard
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM


def timed(fn, repeat: int = 1):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tiled_store(src: Datastore, dest: Path, n_entries: int, factory: str) -> Datastore:
    """A one-shard store of n_entries keys: the source's real keys tiled with 1% noise."""
    keys = np.concatenate([s.index.reconstruct_n(0, s.index.ntotal) for s in src.shards])
    entries = np.concatenate([s.entries for s in src.shards])
    reps = -(-n_entries // len(keys))
    rng = np.random.default_rng(0)
    scale = float(np.std(keys)) * 0.01
    dest.mkdir(parents=True)
    sdir = dest / "shards" / "tiled"
    sdir.mkdir(parents=True)
    index = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    if not index.is_trained:
        index.train(keys[rng.choice(len(keys), min(len(keys), 100_000), replace=False)])
        faiss.write_index(index, str(dest / "quantizer.faiss"))
    rows = []
    added = 0
    for _ in range(reps):
        take = min(len(keys), n_entries - added)
        index.add((keys[:take] + rng.standard_normal((take, keys.shape[1])).astype(np.float32) * scale))
        rows.append(entries[:take])
        added += take
    ent = np.concatenate(rows).astype(ENTRY_DTYPE)
    ent["doc"] = 0
    ent["sent"] = 0
    doc = StoredDocument(index=0, id="tiled", owner="bench", text="tiled", sentences=((0, 5),))
    checksum = write_shard(sdir, index, ent, [doc], {"name": "tiled", "owner": "bench", "index_factory": factory})
    manifest = dataclasses.replace(src.manifest, generation=1, index=IndexRef(factory=factory, nprobe=16),
                                   shards=[ShardRecord("tiled", "bench", "shards/tiled", int(len(ent)), 1, checksum)])
    manifest.write(dest)
    return Datastore.open(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--tokens", type=int, default=4000, help="tokens of held-out text to score")
    ap.add_argument("--large", type=int, default=1_000_000, help="entries in the large store")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    lm = SiloLM.load(args.model, args.store)
    store = lm.store
    texts = [d.text[: args.tokens * 5] for d in load_documents("pkg:demo/test", ["shakespeare"])][:1]

    t_par, r_par = timed(lambda: lm.score(texts, None), repeat=2)
    t_knn, r_knn = timed(lambda: lm.score(texts, lm.retriever("knn", k=32)), repeat=2)
    n_tok = r_par[0].num_tokens
    print(f"demo store: {store.num_entries:,} entries, index {store.manifest.index.factory}")
    print(f"  scoring: parametric {n_tok / t_par:,.0f} tok/s, kNN-LM {n_tok / t_knn:,.0f} tok/s "
          f"-> kNN-LM / parametric = {t_par / t_knn:.3f}")

    # build throughput vs forward throughput on the same text
    docs = [d.text for d in load_documents("pkg:demo/datastore", ["shakespeare"])][:1]
    ex = KeyExtractor(lm.model, lm.tokenizer, window=256, stride=192, batch_size=16)
    t_build, dk = timed(lambda: list(ex.iter_documents(docs)))
    n_keys = sum(len(d.keys) for d in dk)
    ids = torch.tensor(lm.encode(docs[0])[: (n_keys // 256) * 256]).view(-1, 256)
    def forward():
        with torch.inference_mode():
            for i in range(0, len(ids), 16):
                lm.model(input_ids=ids[i:i + 16])
    t_fwd, _ = timed(forward)
    print(f"  build: {n_keys / t_build:,.0f} keys/s vs pure forward {ids.numel() / t_fwd:,.0f} tok/s "
          f"-> build / forward = {(n_keys / t_build) / (ids.numel() / t_fwd):.3f}")
    print(f"  bytes per entry on disk: {dir_bytes(Path(args.store)) / store.num_entries:,.0f} "
          f"(key dim {store.key_dim}; fp32 key alone = {4 * store.key_dim})")

    tmp = Path(tempfile.mkdtemp(prefix="silo-bench-"))
    try:
        for factory in ("Flat", "IVF1024,PQ32"):
            t0 = time.perf_counter()
            big = tiled_store(store, tmp / factory.replace(",", "_"), args.large, factory)
            t_make = time.perf_counter() - t0
            lm.swap_store(big)
            t_big, _ = timed(lambda: lm.score(texts, lm.retriever("knn", k=32)))
            print(f"{big.num_entries:,}-entry store, {factory} (made in {t_make:.0f}s): kNN-LM {n_tok / t_big:,.0f} tok/s "
                  f"-> kNN-LM / parametric = {t_par / t_big:.3f}; bytes per entry "
                  f"{dir_bytes(tmp / factory.replace(',', '_')) / big.num_entries:,.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
