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

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from silo.core.files import crash_point, fsync_path, fsync_tree, write_json_atomic

from .blocks import has_blocks
from .format import DatastoreError, IndexRef, Manifest, ShardRecord, now
from .journal import append_journal
from .keys_store import KEYS_FILE, exact_search, iter_chunks, open_keys, recall_at_k, sample_keys
from .removal import RemovalManager
from .shard import write_index, write_shard_info
from .store import Datastore

CRASH_POINTS = ("mid_reindex_write", "after_reindex_manifest_write")
LINKED_FILES = ("entries.npy", "documents.jsonl", KEYS_FILE)
OPTIONAL_LINKED = ("sentences.npy",)  # the Lookup index; stores built before it existed have none


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def _carry_blocks(old_dir: Path, new_dir: Path, checksum: str) -> None:
    """The shard's RIC blocks into the new folder, re-tied to the new shard checksum (blocks.json is
    replaced, not edited: the linked original stays as it was)."""
    src, dst = old_dir / "blocks", new_dir / "blocks"
    shutil.copytree(src, dst, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))
    info = json.loads((src / "blocks.json").read_text(encoding="utf-8"))
    info.update(shard_checksum=checksum, reindexed=now())
    write_json_atomic(dst / "blocks.json", info)


def _make_index(factory: str, dim: int) -> faiss.Index:
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise DatastoreError(f"factory: {factory!r} is not a FAISS index_factory string for {dim}-d keys "
                             f"({str(exc).strip().splitlines()[-1]})") from None


def _stale_quantizers(store: Path, manifest: Manifest) -> list[Path]:
    return [p for p in store.glob("quantizer*.faiss") if p.name != manifest.index.quantizer]


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
                  seed: int = 0, progress: bool = True) -> ReindexResult:
    """Rebuild every shard's index as `factory` from its stored keys (see the module docstring)."""
    store = Path(store_path)
    if train_sample < 1:
        raise DatastoreError(f"train_sample must be >= 1 (got {train_sample})")
    if nprobe is not None and nprobe < 1:
        raise DatastoreError(f"nprobe must be >= 1 (got {nprobe})")
    mgr = RemovalManager(store)  # its lock and its clean-up of unreferenced shard folders
    with mgr.lock():
        t0 = time.time()
        manifest = Manifest.read(store)
        _collect_garbage(store, mgr, manifest)  # half-written folders of an interrupted reindex or compaction
        dim = int(manifest.model.key_dim)
        keys = _stored_keys(store, manifest, dim)
        gen = int(manifest.generation) + 1
        trained = _train_quantizer(store, factory, dim, keys, train_sample, seed, f"quantizer@g{gen}.faiss", progress)
        train_s = time.time() - t0
        new_recs = [_reindex_shard(store, rec, k, f"shards/{rec.name}@g{gen}", factory, dim, trained)
                    for rec, k in tqdm(list(zip(manifest.shards, keys)), desc="reindex: shards", unit="shard",
                                       disable=not progress or None)]
        fsync_path(store / "shards")
        quantizer = trained[1] if trained else None
        generation_before, factory_before = int(manifest.generation), manifest.index.factory
        manifest.shards = new_recs
        manifest.index = IndexRef(factory=factory, metric=manifest.index.metric,
                                  nprobe=nprobe or manifest.index.nprobe, quantizer=quantizer,
                                  mmap=manifest.index.mmap, extra=dict(manifest.index.extra))
        manifest.generation = gen
        manifest.updated = now()
        manifest.write(store)  # the switch: one atomic write
        crash_point("after_reindex_manifest_write")
        _collect_garbage(store, mgr, manifest)
        result = ReindexResult(
            generation_before=generation_before, generation=gen, factory_before=factory_before, factory=factory,
            nprobe=manifest.index.nprobe, quantizer=quantizer,
            train_sample=int(min(train_sample, sum(len(k) for k in keys))) if quantizer else 0,
            shards={r.name: r.entries for r in new_recs},
            train_seconds=round(train_s, 2), seconds=round(time.time() - t0, 2))
        append_journal(store / "journal.jsonl", "reindex",
                       **{k: v for k, v in result.to_json().items() if "seconds" not in k},
                       checksums={r.name: r.checksum for r in new_recs})
    return result


def _collect_garbage(store: Path, mgr: RemovalManager, manifest: Manifest) -> None:
    """Shard folders and quantizers the manifest does not reference."""
    mgr.collect_garbage(manifest)
    for p in _stale_quantizers(store, manifest):
        p.unlink()


def _stored_keys(store: Path, manifest: Manifest, dim: int) -> list[np.ndarray]:
    """Every shard's stored keys (mapped), checked against the manifest's entry counts."""
    keys = [open_keys(store / rec.dir, dim) for rec in manifest.shards]
    for rec, k in zip(manifest.shards, keys):
        if len(k) != rec.entries:
            raise DatastoreError(f"{store / rec.dir / KEYS_FILE}: {len(k)} keys, the manifest records "
                                 f"{rec.entries} entries")
    return keys


def _train_quantizer(store: Path, factory: str, dim: int, keys: list[np.ndarray], train_sample: int, seed: int,
                     name: str, progress: bool) -> tuple[faiss.Index, str] | None:
    """For an index type that needs training: the trained empty index, written to `store/name` (the
    quantizer every shard shares), and `name`. None for an index that needs no training."""
    probe = _make_index(factory, dim)
    if probe.is_trained:
        return None
    sample = sample_keys(keys, train_sample, seed)
    if len(sample) < 2:
        raise DatastoreError(f"{store}: too few keys ({len(sample)}) to train a {factory} quantizer")
    if progress:
        print(f"reindex: training {factory} on {len(sample):,} sampled keys", file=sys.stderr)
    probe.train(sample)
    faiss.write_index(probe, str(store / name))
    fsync_path(store / name)
    return probe, name


def _reindex_shard(store: Path, rec: ShardRecord, keys: np.ndarray, rel: str, factory: str, dim: int,
                   trained: tuple[faiss.Index, str] | None) -> ShardRecord:
    """Shard `rec` in the new folder `rel`: its files linked from the old folder, the new index built from
    its stored keys, a new shard.json (and blocks re-tied to it). Returns its new manifest record."""
    old_dir, new_dir = store / rec.dir, store / rel
    if new_dir.exists():
        shutil.rmtree(new_dir)
    new_dir.mkdir(parents=True)
    for f in LINKED_FILES + OPTIONAL_LINKED:
        if f in LINKED_FILES or (old_dir / f).exists():
            _link_or_copy(old_dir / f, new_dir / f)
    index = faiss.clone_index(trained[0]) if trained else _make_index(factory, dim)
    for _, chunk in iter_chunks(keys):
        index.add(chunk)
    write_index(new_dir, index)
    del index
    crash_point("mid_reindex_write")
    info_path = old_dir / "shard.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info.pop("checksums", None)
    info.update(index_factory=factory, reindexed=now(), reindexed_from=rec.dir)
    checksum = write_shard_info(new_dir, info)
    if has_blocks(old_dir):
        _carry_blocks(old_dir, new_dir, checksum)
    fsync_tree(new_dir)
    return ShardRecord(name=rec.name, owner=rec.owner, dir=rel, entries=rec.entries, documents=rec.documents,
                       checksum=checksum, removed_docs=list(rec.removed_docs), extra=dict(rec.extra))


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
