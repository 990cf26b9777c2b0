"""One shard: its files, how they are written, loaded, searched and compacted.

    shards/<dir>/
      index.faiss      the keys; an entry's FAISS id is its row in entries.npy
      keys.npy         the keys once more, float16 [entries, key_dim], memory-mappable (keys_store.py);
                       absent in stores built before it existed
      entries.npy      structured array ENTRY_DTYPE: token (next-token id), doc, pos, sent
      documents.jsonl  the shard's documents: index, id, owner, licence, tier, title, sentences, text ...
      shard.json       counts, key dim, index factory, checksums of the files above, created, built-from
      blocks/          RIC-LM text blocks (datastore/blocks.py), optional

This module is the only writer of these files (`write_shard`, `compact_shard`); the build and the
removal state machine call it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from silo.core.files import crash_point, fsync_path, sha256_file, write_json_atomic

from .faiss_utils import compact_index, search_params, to_gpu
from .format import ENTRY_DTYPE, SHARD_FILES, DatastoreError, ShardMissing, ShardRecord, now
from .keys_store import KEYS_FILE, has_keys, write_filtered_keys
from .ondisk import LazyDocuments, read_index_mmap


def read_documents(shard_dir: Path) -> list[dict]:
    with open(Path(shard_dir) / "documents.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_entries(sdir: Path, entries: np.ndarray) -> None:
    np.save(Path(sdir) / "entries.npy", np.ascontiguousarray(entries, dtype=ENTRY_DTYPE))
    fsync_path(Path(sdir) / "entries.npy")


def write_documents(sdir: Path, documents: list[dict]) -> None:
    with open(Path(sdir) / "documents.jsonl", "w", encoding="utf-8") as fh:
        for d in documents:
            fh.write(json.dumps(d, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_index(sdir: Path, index: faiss.Index) -> None:
    faiss.write_index(index, str(Path(sdir) / "index.faiss"))
    fsync_path(Path(sdir) / "index.faiss")


def write_shard_info(sdir: Path, info: dict) -> str:
    """shard.json with the checksums of the shard's files (written first); returns its sha256, which the
    manifest records."""
    sdir = Path(sdir)
    files = SHARD_FILES + ((KEYS_FILE,) if has_keys(sdir) else ())  # keys.npy: optional (older stores)
    info = {**info, "checksums": {f: sha256_file(sdir / f) for f in files}}
    write_json_atomic(sdir / "shard.json", info)
    return sha256_file(sdir / "shard.json")


def write_shard(sdir: Path, index: faiss.Index, entries: np.ndarray, documents: list[dict], info: dict,
                keys_from: tuple[Path, np.ndarray] | None = None) -> str:
    """All of a shard's files into `sdir` (each fsynced), shard.json last; returns shard.json's sha256.
    `keys_from` (source shard folder, keep mask) carries the stored keys of the kept rows."""
    if index.ntotal != len(entries):
        raise DatastoreError(f"{sdir}: {index.ntotal} keys for {len(entries)} entries")
    write_index(sdir, index)
    if keys_from is not None:
        write_filtered_keys(keys_from[0], sdir, keys_from[1])
    write_entries(sdir, entries)
    crash_point("mid_compaction_write")
    write_documents(sdir, documents)
    return write_shard_info(sdir, {**info, "entries": int(len(entries)), "documents": len(documents)})


@dataclass
class Shard:
    """One loaded shard: its index, entries (memory-mapped) and documents (read-only)."""

    name: str
    owner: str
    dir: Path
    index: faiss.Index
    entries: np.ndarray
    documents: list[dict]
    removed_docs: frozenset[int] = frozenset()
    live_entries: int = 0
    _params: object = None
    _keep: object = None  # keeps the selector's id buffer alive while _params is used

    @classmethod
    def load(cls, store_dir: Path, rec: ShardRecord, device: str = "cpu", mmap: bool = False) -> "Shard":
        """`mmap`: map the index, entries and documents instead of reading them (ondisk.py): opening
        costs the same at any shard size and pages are read as searches touch them (CPU only)."""
        d = Path(store_dir) / rec.dir
        for f in SHARD_FILES:
            if not (d / f).exists():
                raise ShardMissing(f"{d / f}: missing; the store is damaged (shard {rec.name})")
        if mmap and device != "cuda":
            index = read_index_mmap(d / "index.faiss")
        else:
            index = faiss.read_index(str(d / "index.faiss"))
        if device == "cuda":
            index = to_gpu(index)
        entries = np.load(d / "entries.npy", mmap_mode="r")
        if index.ntotal != len(entries):
            raise DatastoreError(f"{d}: index holds {index.ntotal} keys but entries.npy {len(entries)} rows")
        docs = LazyDocuments(d / "documents.jsonl", rec.documents) if mmap and device != "cuda" else read_documents(d)
        shard = cls(name=rec.name, owner=rec.owner, dir=d, index=index, entries=entries, documents=docs)
        shard.live_entries = len(entries)
        return shard

    def with_removed(self, removed: frozenset[int], nprobe: int) -> "Shard":
        """A view of this shard that hides the entries of `removed` documents (tombstones)."""
        dead = None
        if removed:
            dead = np.flatnonzero(np.isin(self.entries["doc"], np.fromiter(removed, dtype=np.int64)))
        params, keep = search_params(self.index, nprobe, dead)
        live = len(self.entries) - (0 if dead is None else len(dead))
        return Shard(self.name, self.owner, self.dir, self.index, self.entries, self.documents, frozenset(removed),
                     live, params, keep)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._params is not None:
            return self.index.search(queries, k, params=self._params)
        return self.index.search(queries, k)

    def live_documents(self) -> list[dict]:
        return [d for d in self.documents if d["index"] not in self.removed_docs]


def compact_shard(store_dir: Path, rec: ShardRecord, new_rel: str) -> tuple[ShardRecord, np.ndarray]:
    """Write shard `rec` without its tombstoned documents into `store_dir/new_rel` (a folder no manifest
    references yet). Returns the new record (no tombstones) and the document remap (old index -> new
    index, -1 for removed documents). The caller switches the manifest and deletes the old folder."""
    store_dir = Path(store_dir)
    old_dir, new_dir = store_dir / rec.dir, store_dir / new_rel
    if new_dir.exists():
        shutil.rmtree(new_dir)  # a half-written attempt from a crash; never referenced
    new_dir.mkdir(parents=True)
    removed = set(rec.removed_docs)
    docs = read_documents(old_dir)
    remap = np.full(len(docs), -1, dtype=np.int64)
    kept_docs = []
    for d in docs:
        if d["index"] not in removed:
            remap[d["index"]] = len(kept_docs)
            kept_docs.append({**d, "index": len(kept_docs)})
    entries = np.load(old_dir / "entries.npy")
    keep = remap[entries["doc"]] >= 0
    new_entries = np.ascontiguousarray(entries[keep])
    new_entries["doc"] = remap[new_entries["doc"]].astype(np.int32)
    index = compact_index(faiss.read_index(str(old_dir / "index.faiss")), keep)
    info_path = old_dir / "shard.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info.update(compacted=now(), compacted_from=rec.dir, removed_documents=len(docs) - len(kept_docs))
    keys_from = (old_dir, keep) if has_keys(old_dir) else None  # stored keys follow their entries
    checksum = write_shard(new_dir, index, new_entries, kept_docs, info, keys_from)
    new = ShardRecord(name=rec.name, owner=rec.owner, dir=new_rel, entries=int(len(new_entries)),
                      documents=len(kept_docs), checksum=checksum, extra=dict(rec.extra))
    return new, remap
