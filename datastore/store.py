"""The sharded kNN datastore as an immutable snapshot: open, search, provenance of an entry.

A `Datastore` is one manifest generation (see `format.py`): searches never see a half-applied change,
and a writer (build, removal) publishes a new generation that readers open — or a server swaps in —
as a whole. Shards are loaded by `shard.Shard` (memory-mapped by default: `ondisk.py`); tombstoned
documents are hidden by a FAISS IDSelector; shards are searched in parallel (`parallel.py`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .format import DatastoreError, FingerprintMismatch, Manifest, ShardMissing, StaleGeneration, StoredDocument
from .parallel import map_shards

# Below this many queries the shards are searched one after the other: a generation step's few queries
# gain nothing from threads here (an IVF scan is bound by memory bandwidth, which the threads share:
# 8 queries, k 1,024, two shards on 2 cores took 6.9 ms on threads vs 5.7 ms in turn), while scoring's
# hundreds do (512 queries over five 2M-entry shards: 0.37 s vs 0.54 s).
PARALLEL_MIN_QUERIES = 32
from .shard import Shard


@dataclass
class Neighbors:
    """Merged top-k over all shards. Missing neighbours have token -1 and distance +inf."""

    distances: np.ndarray  # [n, k] float32, squared L2
    tokens: np.ndarray  # [n, k] int32
    shard: np.ndarray  # [n, k] int16, index into Datastore.shards
    ids: np.ndarray  # [n, k] int64, row within the shard

    def truncate(self, k: int) -> "Neighbors":
        return Neighbors(self.distances[:, :k], self.tokens[:, :k], self.shard[:, :k], self.ids[:, :k])

    def rows(self, sel) -> "Neighbors":
        return Neighbors(self.distances[sel], self.tokens[sel], self.shard[sel], self.ids[sel])

    @classmethod
    def empty(cls, n: int, k: int = 0) -> "Neighbors":
        return cls(np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int32),
                   np.zeros((n, k), np.int16), np.full((n, k), -1, np.int64))


@dataclass(frozen=True)
class EntryInfo:
    """Where one datastore entry comes from: its shard, document, licence and sentence."""

    shard: str
    owner: str
    doc_index: int
    document_id: str
    title: str
    license: str
    sentence_index: int
    sentence: str
    token: int  # the next-token id the entry stores


@dataclass(frozen=True)
class ShardSummary:
    name: str
    owner: str
    entries: int  # live entries (tombstoned ones not counted)
    documents: int  # live documents


@dataclass(frozen=True)
class StoreSummary:
    """What a snapshot serves: its generation, model fingerprint, index type and live shards."""

    path: str
    generation: int
    fingerprint: str
    index: str
    entries: int
    shards: list[ShardSummary]

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Datastore:
    """An immutable snapshot of one generation of a store."""

    path: Path
    manifest: Manifest
    shards: list[Shard]
    device: str = "cpu"
    _cache: dict = field(default_factory=dict, repr=False)
    parallel: bool = True  # search the shards on threads (results identical to the sequential loop)
    share_coarse: bool = True  # one coarse search for shards with the same IVF quantizer (same results)

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None, device: str = "cpu",
             reuse: "Datastore | None" = None, retries: int = 5, mmap: bool | None = None) -> "Datastore":
        """Open the current generation. With `fingerprint`, refuse a store built for another model.

        `mmap` maps indexes, entries and documents instead of reading them (opening time and memory do not
        grow with the store); None takes the manifest's `index.mmap` (on unless the build said otherwise).
        It applies on CPU; a cuda store is read and copied to the GPU.

        `reuse` is a previously opened snapshot: shards whose folder and checksum did not change are shared with it
        instead of being read again, so picking up a removal costs only what changed. A removal may delete
        a folder between our reading the manifest and loading its shard; the open is then retried
        (`retries` times) with a fresh manifest, which no longer names the deleted folder.
        """
        for attempt in range(retries + 1):
            try:
                return cls._open(Path(path), fingerprint, device, reuse, mmap)
            except ShardMissing:
                if attempt == retries:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _open(cls, path: Path, fingerprint: str | None, device: str, reuse: "Datastore | None",
              mmap: bool | None = None) -> "Datastore":
        manifest = Manifest.read(path)
        mmap = manifest.index.mmap if mmap is None else mmap
        if fingerprint is not None and manifest.model.fingerprint != fingerprint:
            raise FingerprintMismatch(
                f"{path}: the store was built for model {manifest.model.fingerprint[:23]}... "
                f"({manifest.model.path or '?'}) but the model given is {fingerprint[:23]}...; "
                "keys from one model are meaningless for another: rebuild the store with `silo datastore build`"
            )
        loaded = dict(reuse._cache) if reuse is not None and reuse.path == path else {}
        shards, cache = [], {}
        for rec in manifest.shards:
            base = loaded.get(rec.dir)
            if base is None or base.checksum != rec.checksum:  # a folder name can come back with other content
                base = Shard.load(path, rec, device, mmap=mmap)
            cache[rec.dir] = base
            shards.append(base.with_removed(frozenset(rec.removed_docs), manifest.index.nprobe))
        return cls(path=path, manifest=manifest, shards=shards, device=device, _cache=cache)

    @property
    def generation(self) -> int:
        return int(self.manifest.generation)

    def same_store(self, other: "Datastore") -> bool:
        """Another snapshot of this store (same lineage, or the same folder for stores without one)?"""
        if self.manifest.lineage and other.manifest.lineage:
            return self.manifest.lineage == other.manifest.lineage
        return Path(self.path).resolve() == Path(other.path).resolve()

    def check_not_older(self, current: "Datastore | None") -> None:
        """Refuse to replace `current` by an older generation of the same store (StaleGeneration)."""
        if current is not None and self.same_store(current) and self.generation < current.generation:
            raise StaleGeneration(f"{self.path}: generation {self.generation} is older than the generation "
                                  f"{current.generation} in use; generations of a store only move forward "
                                  "(reopen the store to get its current generation)")

    @property
    def fingerprint(self) -> str:
        return self.manifest.model.fingerprint

    @property
    def key_dim(self) -> int:
        return int(self.manifest.model.key_dim)

    @property
    def num_entries(self) -> int:
        return sum(s.live_entries for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> Neighbors:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.key_dim:
            raise DatastoreError(f"queries must be [n, {self.key_dim}], got {list(q.shape)}")
        n = len(q)
        ds, ts, ss, ids = [], [], [], []
        assigned = self._shared_coarse(q)

        def one(si: int, shard: Shard):
            kk = min(k, shard.live_entries)
            if kk <= 0:
                return None
            if si in assigned:
                return shard.search_preassigned(q, kk, *assigned[si])
            return shard.search(q, kk)

        pool = self.parallel and n >= PARALLEL_MIN_QUERIES
        for si, (shard, res) in enumerate(zip(self.shards, map_shards(one, self.shards, pool))):
            if res is None:
                continue
            D, I = res
            valid = I >= 0
            tok = shard.entries["token"][np.where(valid, I, 0)]
            ds.append(np.where(valid, D, np.inf).astype(np.float32))
            ts.append(np.where(valid, tok, -1).astype(np.int32))
            ss.append(np.full(I.shape, si, dtype=np.int16))
            ids.append(I.astype(np.int64))
        if not ds:
            return Neighbors(np.full((n, 0), np.inf, np.float32), np.zeros((n, 0), np.int32),
                             np.zeros((n, 0), np.int16), np.zeros((n, 0), np.int64))
        D, T, S, I = (np.concatenate(x, axis=1) for x in (ds, ts, ss, ids))
        if len(ds) > 1:
            order = np.argsort(D, axis=1, kind="stable")[:, :k]
            D, T, S, I = (np.take_along_axis(x, order, axis=1) for x in (D, T, S, I))
        return Neighbors(D, T, S, I)

    def _shared_coarse(self, q: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """One coarse search for every group of IVF shards with the same quantizer and nprobe (a store's
        shards are filled from one trained quantizer): {shard index: (assign, coarse distances)}.

        Each shard's own search would repeat the same coarse search, and with a graph quantizer over many
        lists that costs about as much as scanning the probed lists (benchmarks/scale_bench.py, 10M entries
        in five shards, IVF16384_HNSW32,SQ8, nprobe 4: kNN/parametric scoring 0.572 shared, 0.468 per
        shard). The lists probed and their order are the ones each shard would find itself, so results are
        unchanged (tested)."""
        out = {}
        if not self.share_coarse:
            return out
        groups: dict[tuple[str, int], list[int]] = {}  # per call: callers may replace `shards` or their indexes
        for si, shard in enumerate(self.shards):
            if shard.coarse is not None and shard.live_entries > 0:
                groups.setdefault((shard.coarse, shard.nprobe), []).append(si)
        for (_, nprobe), members in groups.items():
            if len(members) < 2:
                continue
            quantizer = faiss.downcast_index(self.shards[members[0]].index).quantizer
            dis, assign = quantizer.search(q, nprobe)
            out.update({si: (assign, dis) for si in members})
        return out

    def doc_keys(self, nb: Neighbors) -> np.ndarray:
        """One int64 per neighbour naming its document store-wide (shard index << 32 | document index);
        -1 where there is no neighbour."""
        out = np.full(nb.ids.shape, -1, dtype=np.int64)
        for si, shard in enumerate(self.shards):
            m = (nb.shard == si) & (nb.tokens >= 0)
            if m.any():
                out[m] = (np.int64(si) << 32) | shard.entries["doc"][nb.ids[m]].astype(np.int64)
        return out

    def context_match(self, nb: Neighbors, context: np.ndarray, bos: int, k: int = 64) -> np.ndarray:
        """[n, min(k, K)] how many of the tokens before each of the first k neighbours equal the query's own
        context (`context` [n, M]: the query's last M input tokens, most recent first, -1 where the text
        starts). A neighbour that continues the very passage the query is reading matches all M.

        Entry r of a document predicts token pos+1 from input token pos; its input tokens going back are
        the values of entries r-1, r-2, ... of the same document (and BOS before its first token)."""
        n, M = context.shape
        kk = min(k, nb.ids.shape[1])
        out = np.zeros((n, kk), dtype=np.int64)
        if kk == 0 or M == 0:
            return out
        ids, sh, alive = nb.ids[:, :kk], nb.shard[:, :kk], nb.tokens[:, :kk] >= 0
        back = np.arange(M, dtype=np.int64)
        for si, shard in enumerate(self.shards):
            sel = (sh == si) & alive
            if not sel.any():
                continue
            e = shard.entries
            r = ids[sel]
            here = e[r]
            doc, pos = here["doc"].astype(np.int64)[:, None], here["pos"].astype(np.int64)[:, None]
            q = context[np.nonzero(sel)[0]]
            p = pos - back  # [R, M] the input positions whose tokens are compared, most recent first
            prev = e[np.clip(r[:, None] - back - 1, 0, len(e) - 1)]  # the entries that predicted them
            same = (prev["doc"] == doc) & (prev["pos"] == p - 1) & (p >= 1)
            tok = np.where(p == 0, bos, np.where(same, prev["token"], -2))
            out[sel] = np.cumprod((tok == q) & (p >= 0), axis=1).sum(axis=1)  # the unbroken run from the query
        return out

    def entry_info(self, shard_index: int, entry_id: int) -> EntryInfo:
        """Provenance of one entry: owner, document, licence and the sentence it belongs to."""
        shard = self.shards[shard_index]
        e = shard.entries[entry_id]
        doc = shard.documents[int(e["doc"])]
        return EntryInfo(shard=shard.name, owner=doc.owner, doc_index=int(e["doc"]), document_id=doc.id,
                         title=doc.title, license=doc.license, sentence_index=int(e["sent"]),
                         sentence=doc.sentence(int(e["sent"])), token=int(e["token"]))

    def document(self, shard_index: int, doc_index: int) -> StoredDocument:
        return self.shards[shard_index].documents[doc_index]

    def summary(self) -> StoreSummary:
        return StoreSummary(
            path=str(self.path), generation=self.generation, fingerprint=self.fingerprint,
            index=self.manifest.index.factory, entries=self.num_entries,
            shards=[ShardSummary(name=s.name, owner=s.owner, entries=s.live_entries,
                                 documents=len(s.documents) - len(s.removed_docs)) for s in self.shards],
        )


def removal_violations(store: Datastore, exclusions) -> list[str]:
    """What of `store` the removals behind `exclusions` (removal_records.read_exclusions of another copy of
    the store) took out: shards, owners' content, documents (by id or text hash). Empty when it honours
    them all (a copy made before a removal, or with its lineage edited away, does not)."""
    if not exclusions:
        return []
    out = []
    for shard in store.shards:
        if shard.name in exclusions.shards:
            out.append(f"shard {shard.name!r}")
            continue
        for d in shard.live_documents():
            if exclusions.excludes(d.id, d.owner, d.sha256, shard.name):
                out.append(f"document {d.id!r} of {d.owner!r}")
    return out
