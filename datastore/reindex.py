"""A new index for every shard from the stored keys (keys.npy), as a new generation: no LM pass.

    silo datastore reindex STORE --factory "IVF4096,PQ64" [--train-sample N] [--nprobe N]

One quantizer is trained on keys sampled across all shards (when the index type needs training) and
shared by every shard, as at build. Each shard gets a NEW folder ``shards/<name>@g<generation>``: its
entries, documents, keys and RIC blocks are hard-linked from the old folder (copied where links are not
possible; shard files are never changed in place, so sharing them is safe), the new index is written
beside them, and shard.json records the new checksums. Then ONE manifest write switches every shard,
the index description and the quantizer file at once; the old folders and quantizer are deleted after.
Tombstones (`removed_docs`) carry over unchanged.

Crash safety is that of compaction: until the manifest write the new folders are unreferenced (the store
opens as the old generation, and the next reindex, `silo datastore resume` or any removal deletes them);
after it the store opens as the new generation, and leftovers of the old one are garbage for the same
clean-up. The removal lock is held throughout, so a removal and a reindex never interleave manifest
writes. ``SILO_CRASH_AT=mid_reindex_write | after_reindex_manifest_write`` kills the process there (tests).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from silo.core.files import crash_point

from .format import DatastoreError, IndexRef, Manifest, now, store_lock
from .indexing import keys_digest, remove_unreferenced, reindex_shards
from .journal import append_journal
from .keys_store import exact_search, open_keys, recall_at_k
from .store import Datastore

CRASH_POINTS = ("mid_reindex_write", "after_reindex_manifest_write")


@dataclass(frozen=True)
class ReindexResult:
    """What a reindex did: the generation and index type before and after, the shared quantizer (None for
    an index that needs no training), the keys it was trained on, entries per shard, and timings."""

    generation_before: int
    generation: int
    factory_before: str
    factory: str
    nprobe: int
    quantizer: str | None
    train_sample: int
    shards: dict[str, int]
    train_seconds: float
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def reindex_store(store_path: str | Path, factory: str, train_sample: int = 200_000, nprobe: int | None = None,
                  progress: bool = True) -> ReindexResult:
    """Rebuild every shard's index as `factory` from its stored keys (see the module docstring)."""
    store = Path(store_path)
    if train_sample < 1:
        raise DatastoreError(f"train_sample must be >= 1 (got {train_sample})")
    if nprobe is not None and nprobe < 1:
        raise DatastoreError(f"nprobe must be >= 1 (got {nprobe})")
    Manifest.read(store)  # fail early, naming the path, if this is not a store
    with store_lock(store):
        t0 = time.time()
        manifest = Manifest.read(store)
        remove_unreferenced(store, manifest)  # half-written folders of an interrupted reindex or compaction
        gen = int(manifest.generation) + 1
        new_recs, quantizer, train_s = reindex_shards(store, manifest, factory, train_sample, gen, progress=progress)
        generation_before, factory_before = int(manifest.generation), manifest.index.factory
        manifest.shards = new_recs
        manifest.index = IndexRef(factory=factory, metric=manifest.index.metric,
                                  nprobe=nprobe or manifest.index.nprobe, quantizer=quantizer,
                                  mmap=manifest.index.mmap, extra=dict(manifest.index.extra))
        if quantizer:  # trained here on keys sampled across the shards: a removal retrains it
            manifest.index.trained_on, manifest.index.train_sample = "store", int(train_sample)
            manifest.index.trained_keys = keys_digest(store, new_recs)
        manifest.generation = gen
        manifest.updated = now()
        manifest.write(store)  # the switch: one atomic write
        crash_point("after_reindex_manifest_write")
        remove_unreferenced(store, manifest)
        result = ReindexResult(
            generation_before=generation_before, generation=gen, factory_before=factory_before, factory=factory,
            nprobe=manifest.index.nprobe, quantizer=quantizer,
            train_sample=int(min(train_sample, sum(r.entries for r in new_recs))) if quantizer else 0,
            shards={r.name: r.entries for r in new_recs},
            train_seconds=round(train_s, 2), seconds=round(time.time() - t0, 2))
        append_journal(store / "journal.jsonl", "reindex",
                       **{k: v for k, v in result.to_json().items() if "seconds" not in k},
                       checksums={r.name: r.checksum for r in new_recs})
    return result


def index_recall(store: Datastore, queries: np.ndarray, ks: tuple[int, ...] = (1, 10, 32),
                 progress: bool = False) -> dict[str, float]:
    """recall@k of the store's indexes (its search, nprobe and tombstones included) against exact search
    over the shards' stored keys, for each k in `ks`."""
    k = max(ks)
    live = []
    for s in store.shards:
        keys = open_keys(s.dir, store.key_dim)
        if s.removed_docs:  # exact search over the live entries only, as the index searches them
            dead = np.isin(s.entries["doc"], np.fromiter(s.removed_docs, dtype=np.int64))
            rows = np.flatnonzero(~dead)
            live.append((keys[rows], rows))
        else:
            live.append((keys, None))
    _, ts, tr = exact_search([x for x, _ in live], queries, k, progress)
    for si, (_, rows) in enumerate(live):
        m = (ts == si) & (tr >= 0)
        if rows is not None and m.any():
            tr[m] = rows[tr[m]]
    nb = store.search(queries, k)
    found_row = np.where(nb.tokens >= 0, nb.ids, -1)
    return {f"recall@{kk}": round(recall_at_k(nb.shard, found_row, ts, tr, kk), 4) for kk in ks}
