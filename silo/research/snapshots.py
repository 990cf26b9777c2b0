"""In-memory views of a store for experiments (never written to disk): a subsample of each shard's
documents (store-size scaling) and the store without some owners (opt-out effect)."""

from __future__ import annotations

import hashlib
import math

import numpy as np

from silo.datastore.faiss_utils import flat_subset
from silo.datastore.shard import Shard
from silo.datastore.store import Datastore


def _rank(seed: int, shard: str, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{shard}\0{doc_id}".encode()).hexdigest()


def subsample(store: Datastore, fraction: float, seed: int = 0) -> Datastore:
    """An in-memory snapshot holding about `fraction` of each shard's live documents (never written).

    Documents are ranked per shard by a seeded hash of their id and the first ceil(fraction * n) kept,
    so subsets are nested across fractions and identical across runs.
    """
    if fraction >= 1:
        return store
    nprobe = store.manifest.index.nprobe
    shards = []
    for s in store.shards:
        live = [i for i in range(len(s.documents)) if i not in s.removed_docs]
        if not live:
            shards.append(s)
            continue
        order = sorted(live, key=lambda i: _rank(seed, s.name, s.documents[i].id))
        keep = set(order[:max(1, math.ceil(fraction * len(order)))])
        dropped = frozenset(s.removed_docs | (set(live) - keep))
        shards.append(_flat_subset(s, keep, dropped) or s.with_removed(dropped, nprobe))
    return Datastore(path=store.path, manifest=store.manifest, shards=shards, device=store.device)


def _flat_subset(s: Shard, keep: set[int], dropped: frozenset[int]) -> Shard | None:
    """For a Flat shard, a smaller exact index of the kept rows (searching a tombstone view of a Flat
    index goes through a per-id selector and loses the BLAS path: many times slower)."""
    rows = np.flatnonzero(np.isin(s.entries["doc"], np.fromiter(keep, dtype=np.int64)))
    sub = flat_subset(s.index, rows)
    if sub is None:
        return None
    return Shard(s.name, s.owner, s.dir, sub, np.asarray(s.entries[rows]), s.documents, dropped, len(rows))


def without_owners(store: Datastore, owners: set[str]) -> Datastore:
    """An in-memory snapshot without the shards of `owners` (the store on disk is untouched)."""
    return Datastore(path=store.path, manifest=store.manifest, device=store.device,
                     shards=[s for s in store.shards if s.owner not in owners])


def live_document_count(store: Datastore) -> int:
    return sum(len(s.documents) - len(s.removed_docs) for s in store.shards)
