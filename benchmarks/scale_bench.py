"""Scale benchmark (not a test: timings are noisy): 1M- and 10M-entry stores in the real on-disk format.

Each store is made of the demo store's real keys tiled with 1% Gaussian noise (as knn_bench.py does),
written shard by shard through the store's own writers (keys.npy float16, entries.npy, documents.jsonl,
index.faiss with one shared trained quantizer, shard.json checksums, manifest, journal), never holding
more than one chunk of keys in memory. `--shards` shards of equal size plus one small owner shard (the
one an owner removal takes out). For each size it prints:

  * kNN-LM / parametric scoring throughput (same held-out text, k=32, fixed mixture; `--gated` adds the
    gated mixture with the demo store's gate), and beside it the same with every shard doing its own
    coarse search (what `Datastore.search` did before shards with one quantizer shared it); the runs are
    taken in turn, best of 3 each;
  * recall@1/10/32 of the ANN index against exact search over the stored keys, on a sample of queries
    (keys of held-out text), exact search streamed over keys.npy;
  * bytes per entry on disk (and per file kind);
  * open time and resident memory after open and after a search, each in a fresh process, memory-mapped
    (the default) and, for the smaller store, read into RAM for contrast;
  * parallel vs sequential shard search time (same results);
  * owner removal (submit + compact + receipt) of the small shard.

and once, on the demo corpus, datastore build throughput (keys/s) against the pure forward pass (tokens/s).

    .venv/bin/python benchmarks/scale_bench.py [--sizes 1000000 10000000]
        [--factory IVF16384_HNSW32,SQ8] [--nprobe 4] [--tmp /tmp] [--keep]

Needs the demo's model and store (bash scripts/demo.sh). The 10M store takes about 8.1 GB of disk (keys
5.1 GB, SQ8 index 2.7 GB) and is deleted at the end unless --keep.

The default index is the one chosen for 10M entries on this 2-core machine: residual SQ8 codes (one byte
per dimension, no lookup tables to compute per probed list, recall@32 0.90) in 16,384 lists under an HNSW
coarse quantizer, 4 lists probed; with IVF-PQ32 each probed list cost a lookup table and recall@32 was
0.69 (README, "Stores larger than RAM").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_bench import dir_bytes, timed  # noqa: E402

from silo.core.corpus import load_documents  # noqa: E402
from silo.datastore.format import ENTRY_DTYPE, IndexRef, ShardRecord  # noqa: E402
from silo.datastore.journal import append_journal  # noqa: E402
from silo.datastore.keys import KeyExtractor  # noqa: E402
from silo.datastore.keys_store import open_keys, write_keys  # noqa: E402
from silo.datastore.reindex import index_recall  # noqa: E402
from silo.datastore.removal import RemovalManager  # noqa: E402
from silo.datastore.removal_records import RemovalRequest  # noqa: E402
from silo.datastore.shard import write_documents, write_entries, write_index, write_shard_info  # noqa: E402
from silo.datastore.store import Datastore  # noqa: E402
from silo.model.lm import SiloLM  # noqa: E402

CHUNK = 65536


def _source(src: Datastore):
    keys = np.concatenate([np.asarray(open_keys(s.dir), np.float32) if (s.dir / "keys.npy").exists()
                           else s.index.reconstruct_n(0, s.index.ntotal) for s in src.shards])
    entries, docs, base = [], [], 0
    for s in src.shards:
        e = np.array(s.entries)
        e["doc"] += base
        entries.append(e)
        docs.extend(s.documents)
        base += len(s.documents)
    return keys, np.concatenate(entries), docs


def _write_tiled_shard(sdir: Path, name: str, owner: str, n: int, keys, entries, docs, trained, rng, scale,
                       factory: str, bar) -> ShardRecord:
    """n entries: whole tiles of the source (documents copied per tile, ids made unique), noisy keys."""
    sdir.mkdir(parents=True)
    index = faiss.clone_index(trained)
    src_n = len(keys)
    rows = np.arange(n) % src_n
    tile = np.arange(n) // src_n
    ent = entries[rows].astype(ENTRY_DTYPE)
    ent["doc"] = ent["doc"] + tile * len(docs)
    ndocs = int(ent["doc"].max()) + 1
    doc_recs = []
    for d in range(ndocs):
        t, i = divmod(d, len(docs))
        doc_recs.append(dataclasses.replace(docs[i], index=d, id=f"{owner}/{docs[i].id}#{t}", owner=owner))

    def chunks():
        for a in range(0, n, CHUNK):
            r = rows[a:a + CHUNK]
            c = keys[r] + rng.standard_normal((len(r), keys.shape[1]), dtype=np.float32) * scale
            index.add(c)
            bar.update(len(c))
            yield c

    write_keys(sdir, chunks(), n, keys.shape[1])
    write_index(sdir, index)
    write_entries(sdir, ent)
    write_documents(sdir, doc_recs)
    checksum = write_shard_info(sdir, {"name": name, "owner": owner, "entries": n, "documents": ndocs,
                                       "key_dim": keys.shape[1], "index_factory": factory, "synthetic": "tiled"})
    return ShardRecord(name, owner, f"shards/{name}", n, ndocs, checksum)


def train_quantizer(keys: np.ndarray, factory: str, n: int) -> faiss.Index:
    """The shared quantizer, trained once on n of the source keys (k-means: 10 iterations)."""
    trained = faiss.index_factory(keys.shape[1], factory, faiss.METRIC_L2)
    if not trained.is_trained:
        ivf = faiss.extract_index_ivf(trained) if "IVF" in factory else None
        if ivf is not None:
            ivf.cp.niter = 10
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        trained.train(keys[rng.choice(len(keys), min(len(keys), n), replace=False)])
        print(f"trained {factory} on {min(len(keys), n):,} keys in {time.perf_counter() - t:.0f}s", flush=True)
    return trained


def tiled_store(src: Datastore, dest: Path, n_entries: int, factory: str, nprobe: int, shards: int,
                trained: faiss.Index, small: int = 20_000) -> Datastore:
    keys, entries, docs = _source(src)
    rng = np.random.default_rng(n_entries)
    scale = float(np.std(keys)) * 0.01
    dest.mkdir(parents=True)
    if trained.is_trained and ivf_like(trained):
        faiss.write_index(trained, str(dest / "quantizer.faiss"))
    big = (n_entries - small) // shards
    plan = [(f"bulk{i:02d}", f"bulk{i:02d}", big) for i in range(shards)] + [("optout", "optout", small)]
    bar = tqdm(total=sum(p[2] for p in plan), desc=f"writing {n_entries:,}-entry store", unit="key", unit_scale=True)
    recs = [_write_tiled_shard(dest / "shards" / name, name, owner, n, keys, entries, docs, trained, rng, scale,
                               factory, bar) for name, owner, n in plan]
    bar.close()
    manifest = dataclasses.replace(src.manifest, generation=1, shards=recs, extra={}, lineage=uuid.uuid4().hex,
                                   index=IndexRef(factory=factory, nprobe=nprobe,
                                                  quantizer="quantizer.faiss" if (dest / "quantizer.faiss").exists() else None,
                                                  # trained on the source store's keys, not the tiled shards': no
                                                  # owner of this store is in it, so a removal keeps it
                                                  trained_on="corpus", train_corpus=[str(src.path)]),
                                   build={"synthetic": "demo keys tiled with 1% noise"})
    manifest.write(dest)
    append_journal(dest / "journal.jsonl", "build", generation=1, entries=sum(r.entries for r in recs))
    return Datastore.open(dest)


def ivf_like(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


OPEN_PROBE = """
import json, sys, time, numpy as np
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
from silo.datastore.store import Datastore
r0 = rss(); t = time.perf_counter()
s = Datastore.open(sys.argv[1], mmap=sys.argv[2] == "1")
t_open = time.perf_counter() - t; r1 = rss()
q = np.random.default_rng(0).standard_normal((64, s.key_dim)).astype(np.float32) * 0.05
s.search(q, 32); r2 = rss()
print(json.dumps({"open_s": t_open, "rss_open": r1 - r0, "rss_search": r2 - r0}))
"""


def open_probe(store: Path, mmap: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", OPEN_PROBE, str(store), "1" if mmap else "0"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_vs_forward(lm: SiloLM) -> tuple[float, float]:
    docs = [d.text for d in load_documents("pkg:demo/datastore", ["shakespeare"])][:1]
    ex = KeyExtractor(lm.model, lm.tokenizer, window=256, stride=192, batch_size=16)
    t_build, dk = timed(lambda: list(ex.iter_documents(docs)), repeat=2)
    n_keys = sum(len(d.keys) for d in dk)
    ids = torch.tensor(lm.encode(docs[0])[: (n_keys // 256) * 256]).view(-1, 256)

    def forward():
        with torch.inference_mode():
            for i in range(0, len(ids), 16):
                lm.model(input_ids=ids[i:i + 16])

    t_fwd, _ = timed(forward, repeat=2)
    return n_keys / t_build, ids.numel() / t_fwd


def interleaved_ratios(lm: SiloLM, texts: list[str], big: Datastore, gated: bool, rounds: int = 3) -> dict:
    """kNN-LM / parametric scoring throughput, each the best of `rounds` runs taken in turn (parametric,
    kNN, kNN with per-shard coarse search, gated), so a change in the machine's speed during the run
    (page cache, other jobs) falls on all of them alike."""
    runs = {"parametric": lambda: lm.score(texts, None),
            "knn": lambda: lm.score(texts, lm.retriever("knn", k=32)),
            "knn_coarse_per_shard": lambda: lm.score(texts, lm.retriever("knn", k=32))}
    if gated:
        runs["gated"] = lambda: lm.score(texts, lm.retriever("knn"))
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            big.share_coarse = name != "knn_coarse_per_shard"  # the code before shards shared it
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    big.share_coarse = True
    out = {"parametric_s": best["parametric"], "knn_over_parametric": best["parametric"] / best["knn"],
           "knn_over_parametric_coarse_per_shard": best["parametric"] / best["knn_coarse_per_shard"]}
    if gated:
        out["gated_over_parametric"] = best["parametric"] / best["gated"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--factory", default="IVF16384_HNSW32,SQ8",
                    help="FAISS index (default: IVF with an HNSW coarse quantizer, so adding 10M keys is quick; "
                         "SQ8 codes, see above)")
    ap.add_argument("--train", type=int, default=131_072, help="keys to train the quantizer on")
    ap.add_argument("--nprobe", type=int, default=4)
    ap.add_argument("--shards", type=int, default=4, help="equal bulk shards (plus one small owner shard)")
    ap.add_argument("--tokens", type=int, default=4000, help="held-out tokens to score")
    ap.add_argument("--queries", type=int, default=256, help="queries for recall (exact search is streamed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gated", action="store_true", help="also time the gated mixture (demo store's gate)")
    ap.add_argument("--tmp", default=None, help="folder for the stores (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)

    lm = SiloLM.load(args.model, args.store)
    demo = lm.store
    texts = [d.text[: args.tokens * 5] for d in load_documents("pkg:demo/test", ["shakespeare"])][:1]
    t_par, r_par = timed(lambda: lm.score(texts, None), repeat=2)
    n_tok = r_par[0].num_tokens
    print(f"parametric scoring: {n_tok / t_par:,.0f} tok/s ({n_tok} tokens)")
    kps, tps = build_vs_forward(lm)
    print(f"build: {kps:,.0f} keys/s vs pure forward {tps:,.0f} tok/s -> build / forward = {kps / tps:.3f}")
    pos = lm.collect(texts)
    rng = np.random.default_rng(0)
    queries = pos.keys[np.sort(rng.choice(len(pos.keys), min(args.queries, len(pos.keys)), replace=False))]

    trained = train_quantizer(_source(demo)[0], args.factory, args.train)
    tmp = Path(tempfile.mkdtemp(prefix="silo-scale-", dir=args.tmp))
    rows = []
    try:
        for n in args.sizes:
            rows.append(measure_size(lm, demo, texts, queries, trained, tmp / f"store-{n}", n, args))
            print(json.dumps(rows[-1], indent=1, default=float), flush=True)
            if not args.keep:
                shutil.rmtree(tmp / f"store-{n}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"stores kept under {tmp}")
    print_summary(rows)


def measure_size(lm: SiloLM, demo: Datastore, texts: list[str], queries: np.ndarray, trained, path: Path, n: int,
                 args) -> dict:
    """One store of n entries tiled from the demo store: bytes, open time and memory, scoring throughput,
    recall, parallel search, and owner removal."""
    t0 = time.perf_counter()
    big = tiled_store(demo, path, n, args.factory, args.nprobe, args.shards, trained)
    t_make = time.perf_counter() - t0
    if args.gated and (Path(args.store) / "gate.json").exists():
        shutil.copy2(Path(args.store) / "gate.json", path / "gate.json")
    size = dir_bytes(path)
    kinds = {f: sum(p.stat().st_size for p in path.rglob(f)) / big.num_entries
             for f in ("index.faiss", "keys.npy", "entries.npy", "documents.jsonl")}
    row = {"entries": big.num_entries, "factory": args.factory, "nprobe": args.nprobe, "make_s": t_make,
           "bytes_per_entry": size / big.num_entries, "bytes_per_entry_by_file": kinds}
    row["open_mmap"] = open_probe(path, True)
    if n <= 2_000_000:
        row["open_read"] = open_probe(path, False)
    lm.swap_store(big)
    ratios = interleaved_ratios(lm, texts, big, gated=args.gated and (path / "gate.json").exists())
    row.update(ratios)
    t = time.perf_counter()
    row["recall"] = index_recall(big, queries, (1, 10, 32), progress=True)
    row["recall_s"] = time.perf_counter() - t
    q512 = np.repeat(queries, 2, axis=0)[:512]
    big.parallel = True
    t_p, a = timed(lambda: big.search(q512, 32), repeat=3)
    big.parallel = False
    t_s, b = timed(lambda: big.search(q512, 32), repeat=3)
    row["search_512q_parallel_s"], row["search_512q_sequential_s"] = t_p, t_s
    row["parallel_identical"] = bool(np.array_equal(a.ids, b.ids) and np.array_equal(a.distances, b.distances))
    lm.swap_store(None)
    big = None  # the store is closed before the removal timings open it again
    times = owner_removals(path, demo, args.factory)
    row["owner_removal_s"] = sorted(times)[1]
    row["owner_removal_runs_s"] = times
    return row


def owner_removals(path: Path, demo: Datastore, factory: str, runs: int = 3) -> list[float]:
    """Seconds of `runs` owner removals (submit + compact + receipt) of a small shard, put back between runs."""
    times = []
    for i in range(runs):
        t = time.perf_counter()
        m = RemovalManager(path)
        req = RemovalRequest(owner="optout", requester="bench", reason="benchmark", request_id=f"bench-{i}")
        m.compact(m.submit(req).request_id)
        times.append(time.perf_counter() - t)
        # put the shard back for the next repeat: not timed (restore the manifest entry and folder)
        if i < runs - 1:
            _restore_owner(path, demo, factory)
    return times


def print_summary(rows: list[dict]) -> None:
    print("\nsummary")
    print(f"{'entries':>11} {'knn/par':>8} {'(own coarse)':>12} {'R@1':>6} {'R@10':>6} {'R@32':>6} {'B/entry':>8} {'open s':>7} "
          f"{'RSS open MB':>11} {'RSS search MB':>13} {'removal s':>9}")
    for r in rows:
        o = r["open_mmap"]
        print(f"{r['entries']:>11,} {r['knn_over_parametric']:>8.3f} {r['knn_over_parametric_coarse_per_shard']:>12.3f} "
              f"{r['recall']['recall@1']:>6.3f} "
              f"{r['recall']['recall@10']:>6.3f} {r['recall']['recall@32']:>6.3f} {r['bytes_per_entry']:>8.1f} "
              f"{o['open_s']:>7.3f} {o['rss_open'] / 2**20:>11.1f} {o['rss_search'] / 2**20:>13.1f} "
              f"{r['owner_removal_s']:>9.3f}")


def _restore_owner(path: Path, demo: Datastore, factory: str) -> None:
    """Re-add a fresh 'optout' shard after a timed removal (same size), so each repeat removes one."""
    from silo.datastore.format import Manifest

    m = Manifest.read(path)
    keys, entries, docs = _source(demo)
    trained = faiss.read_index(str(path / "quantizer.faiss")) if (path / "quantizer.faiss").exists() else \
        faiss.index_factory(keys.shape[1], factory)
    name = f"optout-{m.generation}"
    with tqdm(total=20_000, disable=True) as bar:
        rec = _write_tiled_shard(path / "shards" / name, name, "optout", 20_000, keys, entries, docs, trained,
                                 np.random.default_rng(m.generation), float(np.std(keys)) * 0.01, factory, bar)
    m.shards.append(rec)
    m.next_generation()
    m.write(path)


if __name__ == "__main__":
    main()
