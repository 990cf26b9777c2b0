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

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import faiss
import numpy as np

from silo.core.files import crash_point, fsync_path, sha256_file, write_json_atomic

from .faiss_utils import coarse_identity, compact_index, search_params, to_gpu
from .format import ENTRY_DTYPE, SHARD_FILES, DatastoreError, ShardMissing, ShardRecord, StoredDocument, now, parse_document
from .keys_store import KEYS_FILE, has_keys, write_filtered_keys
from .ondisk import LazyDocuments, read_index, read_index_mmap


def read_documents(shard_dir: Path) -> list[StoredDocument]:
    path = Path(shard_dir) / "documents.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [parse_document(line, f"{path}:{n}") for n, line in enumerate(fh, 1) if line.strip()]


def write_entries(sdir: Path, entries: np.ndarray) -> None:
    np.save(Path(sdir) / "entries.npy", np.ascontiguousarray(entries, dtype=ENTRY_DTYPE))
    fsync_path(Path(sdir) / "entries.npy")


def write_documents(sdir: Path, documents: Sequence[StoredDocument]) -> None:
    """documents.jsonl and the sentence-hash lookup index built from it (sentences.npy)."""
    with open(Path(sdir) / "documents.jsonl", "w", encoding="utf-8") as fh:
        for d in documents:
            fh.write(json.dumps(d.to_json(), ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    np.save(Path(sdir) / "sentences.npy", sentence_index(documents))
    fsync_path(Path(sdir) / "sentences.npy")


SENTENCE_DTYPE = np.dtype([("hash", "<u8"), ("doc", "<i4"), ("chars", "<i4")])
MIN_SENTENCE_CHARS = 20  # shorter sentences ("Ay.", "Exeunt.") say nothing about a document


def normalise(text: str) -> str:
    return " ".join(text.split())


def sentence_hash(text: str) -> int:
    """64-bit hash of a whitespace-normalised sentence (the lookup key; the index holds no text)."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "little")


def sentence_index(documents: Iterable[StoredDocument]) -> np.ndarray:
    """(hash, doc, chars) of every sentence of at least MIN_SENTENCE_CHARS characters, sorted by hash."""
    rows = []
    for d in documents:
        for a, b in d.sentences:
            sent = normalise(d.text[a:b])
            if len(sent) >= MIN_SENTENCE_CHARS:
                rows.append((sentence_hash(sent), d.index, len(sent)))
    out = np.array(rows, dtype=SENTENCE_DTYPE) if rows else np.zeros(0, SENTENCE_DTYPE)
    return out[np.argsort(out["hash"], kind="stable")]


def write_index(sdir: Path, index: faiss.Index) -> None:
    faiss.write_index(index, str(Path(sdir) / "index.faiss"))
    fsync_path(Path(sdir) / "index.faiss")


def write_shard_info(sdir: Path, info: dict) -> str:
    """shard.json with the checksums of the shard's files (written first); returns its sha256, which the
    manifest records."""
    sdir = Path(sdir)
    files = SHARD_FILES + ((KEYS_FILE,) if has_keys(sdir) else ())  # keys.npy: optional (older stores)
    files += ("sentences.npy",) if (sdir / "sentences.npy").exists() else ()  # optional (older stores)
    info = {**info, "checksums": {f: sha256_file(sdir / f) for f in files}}
    write_json_atomic(sdir / "shard.json", info)
    return sha256_file(sdir / "shard.json")


def write_shard(sdir: Path, index: faiss.Index, entries: np.ndarray, documents: Sequence[StoredDocument], info: dict,
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
    documents: Sequence[StoredDocument]  # a list, or LazyDocuments over a mapped documents.jsonl
    removed_docs: frozenset[int] = frozenset()
    live_entries: int = 0
    _params: object = None
    _keep: object = None  # keeps the selector's id buffer alive while _params is used
    sentences: np.ndarray | None = None  # the lookup index (SENTENCE_DTYPE), sorted by hash
    checksum: str | None = None  # of shard.json: which version of the shard this is (reuse across snapshots)
    _labels: dict = field(default_factory=dict, repr=False)  # document_labels' result, shared by the views

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
            index = read_index(d / "index.faiss")
        if device == "cuda":
            index = to_gpu(index)
        entries = np.load(d / "entries.npy", mmap_mode="r" if mmap and device != "cuda" else None)
        # a plain array over the same mapping: np.memmap's Python-level indexing costs more than the lookups a
        # generation step makes (tokens, documents and context of 8 rows x 1,024 neighbours)
        entries = np.asarray(entries)
        if index.ntotal != len(entries):
            raise DatastoreError(f"{d}: index holds {index.ntotal} keys but entries.npy {len(entries)} rows")
        docs = LazyDocuments(d / "documents.jsonl", rec.documents) if mmap and device != "cuda" else read_documents(d)
        # stores written before the lookup index existed get it in memory, from the documents
        sentences = np.load(d / "sentences.npy", mmap_mode="r") if (d / "sentences.npy").exists() \
            else sentence_index(docs)
        top = faiss.downcast_index(index)
        if isinstance(top, faiss.IndexIVF):  # CPU IVF (a GPU index is another class)
            # FAISS's default (0) splits queries over its threads in IndexIVF.search, around the coarse search;
            # search_preassigned (the shared coarse search, Datastore.search) then runs on one thread. Mode 3
            # splits them inside search_preassigned instead: the same per-query work and results either way
            # (a generation step's 8 queries: 699 tok/s with mode 0, 889 with mode 3, 874 per-shard coarse).
            top.parallel_mode = 3
        shard = cls(name=rec.name, owner=rec.owner, dir=d, index=index, entries=entries, documents=docs,
                    sentences=sentences, checksum=rec.checksum)
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
                     live, params, keep, self.sentences, self.checksum, self._labels)

    def document_labels(self) -> tuple[np.ndarray, list[tuple[str, str]]]:
        """(a code per document, the (owner, licence) pair of each code): what an output policy's rules
        read of a document, read once per loaded shard (a policy's allowed documents are then a lookup, not
        a pass over every document's JSON)."""
        if "labels" not in self._labels:
            pairs: dict[tuple[str, str], int] = {}
            codes = np.fromiter((pairs.setdefault((d.owner, d.license), len(pairs)) for d in self.documents),
                                dtype=np.int64, count=len(self.documents))
            self._labels["labels"] = (codes, list(pairs))
        return self._labels["labels"]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._params is None:
            return self.index.search(queries, k)
        try:
            return self.index.search(queries, k, params=self._params)
        except RuntimeError:  # an index type without IDSelector support (PQ, LSH, ...): filter ourselves
            return self._search_filtered(queries, k)

    @property
    def coarse(self) -> str | None:
        """Digest of this shard's IVF coarse quantizer (faiss_utils.coarse_identity), None for other indexes."""
        return coarse_identity(self.index)

    @property
    def nprobe(self) -> int | None:
        """Lists probed per query (IVF indexes), as the shard's own search would probe them."""
        top = faiss.downcast_index(self.index)
        if not isinstance(top, faiss.IndexIVF):
            return None
        nprobe = getattr(self._params, "nprobe", None) or top.nprobe
        return int(min(nprobe, top.nlist))

    def search_preassigned(self, queries: np.ndarray, k: int, assign: np.ndarray,
                           coarse_dis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`search` with the coarse quantization already done (`assign`, `coarse_dis`: [n, nprobe] from a
        quantizer equal to this shard's, see `coarse`): the same results as `search`, without the coarse
        search. An index that refuses the tombstone selector falls back to `search`."""
        top = faiss.downcast_index(self.index)
        n = len(queries)
        assign = np.ascontiguousarray(assign, dtype=np.int64)
        coarse_dis = np.ascontiguousarray(coarse_dis, dtype=np.float32)
        D = np.empty((n, k), dtype=np.float32)
        I = np.empty((n, k), dtype=np.int64)
        sp = faiss.swig_ptr
        try:  # the C++ call: FAISS's Python wrapper of it takes no search parameters (the tombstone selector)
            top.search_preassigned_c(n, sp(queries), k, sp(assign), sp(coarse_dis), sp(D), sp(I), False,
                                     self._params, None)
        except RuntimeError:
            return self.search(queries, k)
        return D, I

    def _search_filtered(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k among the live entries: over-fetch by the number of tombstoned entries (never fewer than k
        survive), drop those rows, keep the first k. Only an index that refuses selectors comes here."""
        dead = self._keep[0] if self._keep is not None and self._keep[0] is not None else np.zeros(0, np.int64)
        fetch = min(self.index.ntotal, k + len(dead))
        params = None
        nprobe = getattr(self._params, "nprobe", None)
        if nprobe:
            import faiss

            params = faiss.SearchParametersIVF(nprobe=nprobe)
        D, I = self.index.search(queries, fetch, params=params) if params else self.index.search(queries, fetch)
        alive = ~np.isin(I, dead) & (I >= 0)
        order = np.argsort(~alive, axis=1, kind="stable")[:, :k]  # live rows first, in distance order
        D, I, alive = (np.take_along_axis(x, order, axis=1) for x in (D, I, alive))
        return np.where(alive, D, np.inf).astype(np.float32), np.where(alive, I, -1)

    def live_documents(self) -> list[StoredDocument]:
        return [d for d in self.documents if d.index not in self.removed_docs]


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
        if d.index not in removed:
            remap[d.index] = len(kept_docs)
            kept_docs.append(replace(d, index=len(kept_docs)))
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
