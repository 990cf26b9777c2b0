"""Removal benchmark (not a test): owner-removal time vs store size, and compaction throughput.

    .venv/bin/python benchmarks/removal_bench.py [--shards 8] [--scale 10] [--entries 4000] [--dim 64]

1. Owner removal: two synthetic stores in the real on-disk format (manifest, per-owner shards with a
   FAISS index, entries.npy, documents.jsonl, shard.json, journal), the second `--scale` times as many
   shards of the same size. One owner (one shard of the same size in both) is removed with
   `RemovalManager.submit` + `compact` (request recorded, manifest generation, folder deleted, receipt),
   a few times each; the medians are printed side by side with their ratio, which should be about 1:
   the cost depends on the removed shard, not on the rest of the store.
2. Document removal: one large shard (Flat, and IVF), one document tombstoned, then compacted (a new
   shard folder rewritten without it); throughput = entries rewritten per second.

Synthetic keys are random: the numbers measure file and index work, not search quality.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from silo.datastore.journal import append_journal
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalRequest
from silo.datastore.format import ENTRY_DTYPE, IndexRef, Manifest, ModelRef, ShardRecord, StoredDocument
from silo.datastore.shard import write_shard

WORDS = "the of and to in that is was he for it with as his on be at by had not are but from or have".split()


def _text(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words)) + "."


def make_shard(root: Path, name: str, owner: str, n_entries: int, n_docs: int, dim: int, rng,
                factory: str = "Flat", trained: faiss.Index | None = None) -> ShardRecord:
    sdir = root / "shards" / name
    sdir.mkdir(parents=True)
    keys = rng.standard_normal((n_entries, dim), dtype=np.float32)
    index = faiss.clone_index(trained) if trained is not None else faiss.index_factory(dim, factory)
    index.add(keys)
    per = n_entries // n_docs
    entries = np.zeros(n_entries, ENTRY_DTYPE)
    entries["doc"] = np.minimum(np.arange(n_entries) // per, n_docs - 1)
    entries["token"] = rng.integers(0, 8000, n_entries)
    entries["pos"] = np.arange(n_entries) - entries["doc"] * per
    docs = []
    for d in range(n_docs):
        text = _text(rng, 40)
        docs.append(StoredDocument(index=d, id=f"{owner}/doc{d}", owner=owner, text=text, license="CC-BY-4.0",
                                   tier="by", title=f"doc {d}", source="synthetic", domain="x",
                                   tokens=int((entries["doc"] == d).sum()), sentences=((0, len(text)),)))
    checksum = write_shard(sdir, index, entries, docs, {"name": name, "owner": owner, "key_dim": dim,
                                                        "index_factory": factory})
    return ShardRecord(name, owner, f"shards/{name}", n_entries, n_docs, checksum)


def build_store(root: Path, n_shards: int, entries: int, dim: int, seed: int = 0, docs: int = 20,
                factory: str = "Flat") -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    trained = None
    if factory != "Flat":
        trained = faiss.index_factory(dim, factory)
        trained.train(rng.standard_normal((max(entries, 4096), dim), dtype=np.float32))
        faiss.write_index(trained, str(root / "quantizer.faiss"))
    recs = [make_shard(root, f"owner{i:04d}", f"owner{i:04d}", entries, docs, dim, rng, factory, trained)
            for i in range(n_shards)]
    Manifest(generation=1, model=ModelRef("sha256:synthetic", "", dim, 8000),
             index=IndexRef(factory, "l2", 8, "quantizer.faiss" if trained is not None else None),
             shards=recs, build={"synthetic": True}).write(root)
    append_journal(root / "journal.jsonl", "build", generation=1, entries=n_shards * entries)
    return root


def time_owner_removals(store: Path, owners: list[str]) -> list[float]:
    out = []
    for o in owners:
        t = time.perf_counter()
        m = RemovalManager(store)
        st = m.submit(RemovalRequest(owner=o, requester="bench", reason="benchmark"))
        m.compact(st.request_id)
        out.append(time.perf_counter() - t)
    return out


def time_compaction(store: Path, owner: str) -> tuple[float, int]:
    m = RemovalManager(store)
    st = m.submit(RemovalRequest(document_ids=[f"{owner}/doc0"], requester="bench", reason="benchmark"))
    entries = st.targets.drop_documents[0].removed_entries
    t = time.perf_counter()
    m.compact(st.request_id)
    return time.perf_counter() - t, entries


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8, help="shards in the small store")
    ap.add_argument("--scale", type=int, default=10, help="the large store has this many times more shards")
    ap.add_argument("--entries", type=int, default=4000, help="entries per shard (owner-removal stores)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compact-entries", type=int, default=200_000, help="entries of the compaction shard")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="silo-removal-bench-"))
    try:
        sizes = [args.shards, args.shards * args.scale]
        rows = []
        for n in sizes:
            t = time.perf_counter()
            store = build_store(tmp / f"store{n}", n, args.entries, args.dim)
            build_s = time.perf_counter() - t
            mb = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20
            times = time_owner_removals(store, [f"owner{i:04d}" for i in range(args.repeats)])
            rows.append((n, n * args.entries, mb, build_s, statistics.median(times), times))
        print(f"owner removal (submit + compact + receipt), {args.entries:,} entries x {args.dim} dims per shard, "
              f"median of {args.repeats}")
        print(f"{'shards':>7} {'entries':>11} {'store MB':>9} {'build s':>8} {'removal ms':>11}  runs (ms)")
        for n, e, mb, b, med, times in rows:
            print(f"{n:>7} {e:>11,} {mb:>9.1f} {b:>8.1f} {1000 * med:>11.1f}  "
                  + ", ".join(f"{1000 * x:.1f}" for x in times))
        print(f"store size ratio {rows[1][1] / rows[0][1]:.1f}x -> removal time ratio {rows[1][4] / rows[0][4]:.2f}x")

        print(f"\ndocument removal compaction, one shard of {args.compact_entries:,} entries x {args.dim} dims "
              "(20 documents; one removed; entries/s = entries rewritten)")
        print(f"{'index':>10} {'compact s':>10} {'entries/s':>12} {'removed':>8}")
        for factory in ("Flat", "IVF64,Flat"):
            store = build_store(tmp / f"compact-{factory.replace(',', '_')}", 1, args.compact_entries, args.dim,
                                seed=1, factory=factory)
            secs, removed = time_compaction(store, "owner0000")
            kept = args.compact_entries - removed
            print(f"{factory:>10} {secs:>10.2f} {kept / secs:>12,.0f} {removed:>8,}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
