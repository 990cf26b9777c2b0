"""Stores larger than RAM: a shard opened memory-mapped instead of read.

* the FAISS index through FAISS's own IO flags: ``IO_FLAG_MMAP_IFC`` maps the codes of flat-coded indexes
  (Flat, SQ, PQ ...) in place, and IVF indexes are re-opened with ``IO_FLAG_MMAP``, which turns their
  inverted lists into read-only ``OnDiskInvertedLists`` over the index file itself (what FAISS's
  ``contrib/ondisk.py`` builds, without a second file);
* entries.npy and keys.npy with ``np.load(mmap_mode="r")``;
* documents.jsonl as a mapped file whose line offsets are found on first use (`LazyDocuments`): opening
  reads nothing, a document is parsed when it is asked for (attribution, provenance), and the few most
  recent are cached.

Opening is then a few small reads per shard whatever the store's size, and resident memory grows only with
the pages searches touch (file-backed, so the kernel can drop them again). A mapping stays valid after a
removal deletes the folder, so a snapshot keeps working until it is released. Index types FAISS cannot
map are read whole, as before.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from .faiss_utils import ivf_of
from .format import DatastoreError, StoredDocument, parse_document

_NEWLINE = 10
_SCAN = 1 << 26  # bytes per chunk when scanning documents.jsonl for line ends


# FAISS's IVF-PQ "precomputed table" (nlist x M x 256 floats, built when an index is read) speeds each
# probe up but does not depend on the shard's size: 134 MB per shard at 4,096 lists x PQ32, 537 MB at
# 16,384. Shards read it only while it stays under this size; larger indexes compute their per-probe
# tables at search time (what FAISS does without the table), so resident memory stays bounded.
PRECOMPUTED_TABLE_MAX_BYTES = 256 << 20
READ_FLAGS = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE


def bounded_precomputed_table(index: faiss.Index, max_bytes: int = PRECOMPUTED_TABLE_MAX_BYTES) -> faiss.Index:
    """After a read with IO_FLAG_SKIP_PRECOMPUTE_TABLE: build the IVF-PQ table if it is at most max_bytes."""
    ivf = ivf_of(index)
    if ivf is None:
        return index
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.by_residual and ivf.precomputed_table.size() == 0:
        if ivf.nlist * ivf.pq.M * ivf.pq.ksub * 4 <= max_bytes:
            ivf.precompute_table()
    return index


def read_index(path: Path) -> faiss.Index:
    """`path` read into memory (its IVF-PQ precomputed table bounded, see PRECOMPUTED_TABLE_MAX_BYTES)."""
    return bounded_precomputed_table(faiss.read_index(str(path), READ_FLAGS))


def read_index_mmap(path: Path) -> faiss.Index:
    """`path` opened memory-mapped when FAISS can map its type (see the module docstring), else read.

    The first read maps flat-coded indexes and refuses IVF ones cheaply (it stops at their inverted lists);
    those are then opened with IO_FLAG_MMAP, so every index is read once."""
    path = str(path)
    probe_flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(path, probe_flags)
        if ivf_of(index) is None:
            return index
    except RuntimeError:
        pass  # an IVF index (its inverted lists cannot be skipped with these flags)
    try:
        index = faiss.read_index(path, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY | READ_FLAGS)
    except RuntimeError:
        return read_index(Path(path))  # a type FAISS cannot map: read it whole
    no_prefetch_threads(index)
    return bounded_precomputed_table(index)


def no_prefetch_threads(index: faiss.Index) -> None:
    """Searches on mapped inverted lists touch their pages in the calling threads.

    `OnDiskInvertedLists` starts `prefetch_nthread` (32) threads on every search call to read the probed
    lists ahead; with pages already in the page cache that costs more than the search itself (a
    447k-entry IVF1024 shard, nprobe 16, one query per call: 3.3 ms with the prefetch threads, 0.8 ms
    without, the same as the index read into RAM)."""
    ivf = ivf_of(index)
    if ivf is not None:
        lists = faiss.downcast_InvertedLists(ivf.invlists)
        if isinstance(lists, faiss.OnDiskInvertedLists):
            lists.prefetch_nthread = 0


def is_mapped(index: faiss.Index) -> bool:
    """True when the index's bulk data is a file mapping rather than heap memory (for tests and reports)."""
    ivf = ivf_of(index)
    if ivf is not None:
        return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
    flat = faiss.downcast_index(index)
    codes = getattr(flat, "codes", None)
    return bool(codes is not None and getattr(codes, "is_owned", True) is False)


class LazyDocuments(Sequence):
    """documents.jsonl as a read-only sequence of StoredDocuments, mapped and parsed on demand.

    `count` is the number of documents the manifest records; it answers ``len`` without reading the file
    and is checked against the file when the line offsets are first computed."""

    def __init__(self, path: Path, count: int, cache: int = 64):
        self.path = Path(path)
        self._count = int(count)
        size = self.path.stat().st_size
        # mapped now, so a removal deleting the folder later does not pull the text from under us
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        self._starts: np.ndarray | None = None
        self._ends: np.ndarray | None = None
        self._cache: OrderedDict[int, StoredDocument] = OrderedDict()
        self._cache_size = cache
        self._lock = threading.Lock()

    def _index(self) -> None:
        with self._lock:
            if self._starts is not None:
                return
            ends = [np.flatnonzero(self._buf[i:i + _SCAN] == _NEWLINE) + i for i in range(0, len(self._buf), _SCAN)]
            e = np.concatenate(ends) if ends else np.zeros(0, np.int64)
            if len(self._buf) and (not len(e) or e[-1] != len(self._buf) - 1):
                e = np.append(e, len(self._buf))  # a last line without a newline
            s = np.concatenate([[0], e[:-1] + 1]) if len(e) else np.zeros(0, np.int64)
            nonblank = e > s
            s, e = s[nonblank], e[nonblank]
            if len(s) != self._count:
                raise DatastoreError(f"{self.path}: {len(s)} documents, the manifest records {self._count}")
            self._starts, self._ends = s.astype(np.int64), e.astype(np.int64)

    def __len__(self) -> int:
        return self._count

    def _get(self, i: int) -> StoredDocument:
        with self._lock:
            hit = self._cache.get(i)
            if hit is not None:
                self._cache.move_to_end(i)
                return hit
        if self._starts is None:
            self._index()
        doc = parse_document(bytes(self._buf[self._starts[i]:self._ends[i]]), f"{self.path}: document {i}")
        with self._lock:
            self._cache[i] = doc
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return doc

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self._count))]
        i = int(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"document {i} out of range ({self._count} in {self.path})")
        return self._get(i)

    def __iter__(self):
        for i in range(self._count):
            yield self._get(i)
