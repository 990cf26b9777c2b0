"""A shard's keys, kept once: ``shards/<dir>/keys.npy``, float16 [entries, key_dim], row i = entry i.

The build writes them beside the index so a new index (another FAISS type, a retrained quantizer) can be
made from the stored keys without running the LM again (`reindex.py`), and so recall can be measured
against exact search. The file is a plain NumPy ``.npy`` (memory-mapped on read: opening costs nothing
whatever the store's size), checksummed in shard.json like the other shard files, and carried (filtered)
by compaction. float16 halves the bytes of float32; its rounding (relative 2^-11) is far below the
distance gaps kNN-LM relies on.

Every writer here streams in chunks, so shards larger than RAM are converted, filtered and sampled with
bounded memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from silo.core.files import fsync_path

from .format import DatastoreError

KEYS_FILE = "keys.npy"
KEYS_DTYPE = np.dtype("<f2")
CHUNK = 65536  # rows per chunk when streaming keys
_F16_MAX = float(np.finfo(np.float16).max)


def keys_path(shard_dir: Path) -> Path:
    return Path(shard_dir) / KEYS_FILE


def has_keys(shard_dir: Path) -> bool:
    return keys_path(shard_dir).exists()


def open_keys(shard_dir: Path, dim: int | None = None) -> np.ndarray:
    """The shard's keys, memory-mapped read-only ([n, d] float16); DatastoreError naming the file when it
    is missing or malformed."""
    path = keys_path(shard_dir)
    if not path.exists():
        raise DatastoreError(f"{path}: missing; this shard was built without stored keys (rebuild the store "
                             "with `silo datastore build` to keep them)")
    try:
        keys = np.load(path, mmap_mode="r")
    except ValueError as exc:
        raise DatastoreError(f"{path}: not a NumPy array file ({exc})") from None
    if keys.dtype != KEYS_DTYPE or keys.ndim != 2 or (dim is not None and keys.shape[1] != dim):
        raise DatastoreError(f"{path}: expected float16 [n, {dim or 'key_dim'}] keys, found {keys.dtype} "
                             f"{list(keys.shape)}")
    return keys


def iter_chunks(keys: np.ndarray, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 contiguous chunk) over a key array of any dtype."""
    for i in range(0, len(keys), chunk):
        yield i, np.ascontiguousarray(keys[i:i + chunk], dtype=np.float32)


def _to_f16(chunk: np.ndarray, where: Path) -> np.ndarray:
    if len(chunk) and float(np.abs(chunk).max()) > _F16_MAX:
        raise DatastoreError(f"{where}: a key component exceeds the float16 range ({_F16_MAX:g}); this model's "
                             "output-layer inputs cannot be stored as float16 keys")
    return chunk.astype(KEYS_DTYPE)


def write_keys(shard_dir: Path, chunks: Iterator[np.ndarray], n: int, dim: int) -> Path:
    """Write keys.npy ([n, dim] float16) from float32 chunks whose rows add up to n; fsynced."""
    path = keys_path(shard_dir)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=KEYS_DTYPE, shape=(n, dim))
    at = 0
    for c in chunks:
        c = np.asarray(c).reshape(-1, dim)
        if at + len(c) > n:
            raise DatastoreError(f"{path}: more keys than the {n} entries of the shard")
        out[at:at + len(c)] = _to_f16(c, path)
        at += len(c)
    if at != n:
        raise DatastoreError(f"{path}: {at} keys written for {n} entries")
    out.flush()
    del out
    fsync_path(path)
    return path


def keys_from_f32(shard_dir: Path, f32_file: Path, dim: int, remove: bool = True) -> Path:
    """Convert a raw float32 key file (the build's scratch file) into keys.npy; the scratch file is
    deleted afterwards unless `remove` is False."""
    raw = np.memmap(f32_file, dtype=np.float32, mode="r").reshape(-1, dim) if Path(f32_file).stat().st_size else \
        np.zeros((0, dim), np.float32)
    path = write_keys(shard_dir, (c for _, c in iter_chunks(raw)), len(raw), dim)
    del raw
    if remove:
        Path(f32_file).unlink()
    return path


def write_filtered_keys(src_dir: Path, dst_dir: Path, keep: np.ndarray) -> Path:
    """keys.npy of `src_dir` without the rows where `keep` is False, into `dst_dir` (compaction)."""
    src = open_keys(src_dir)
    keep = np.asarray(keep, dtype=bool)
    if len(keep) != len(src):
        raise DatastoreError(f"{keys_path(src_dir)}: {len(src)} keys for a keep mask of {len(keep)} rows")
    chunks = (c[keep[i:i + len(c)]] for i, c in iter_chunks(src))
    return write_keys(dst_dir, chunks, int(keep.sum()), src.shape[1])


def sample_keys(shard_keys: Sequence[np.ndarray], n: int, seed: int = 0) -> np.ndarray:
    """n keys drawn uniformly without replacement over the concatenation of the shards' keys
    (float32, row order of the concatenation), to train a quantizer shared by every shard."""
    sizes = np.array([len(k) for k in shard_keys], dtype=np.int64)
    total = int(sizes.sum())
    take = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    out, base = [], 0
    for keys, size in zip(shard_keys, sizes):
        local = take[(take >= base) & (take < base + size)] - base
        out.append(np.asarray(keys[local], dtype=np.float32))
        base += int(size)
    dim = shard_keys[0].shape[1] if len(shard_keys) else 0
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, dim), np.float32)


def exact_search(shard_keys: Sequence[np.ndarray], queries: np.ndarray, k: int,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-k (squared L2) of `queries` over the stored keys of several shards, streamed in chunks
    (bounded memory at any store size): distances [n, k], shard index [n, k], row [n, k]; -1 / inf where a
    store holds fewer than k keys. The ground truth that recall@k is measured against."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(q)
    heap = faiss.ResultHeap(n, k)  # keeps the k smallest (distance, global id) per query
    offsets = np.cumsum([0] + [len(x) for x in shard_keys])
    total = int(offsets[-1])
    bar = tqdm(total=total, desc="exact search", unit="key", unit_scale=True, disable=not progress or None)
    for si, keys in enumerate(shard_keys):
        for i, chunk in iter_chunks(keys, 1 << 18):
            D, I = faiss.knn(q, chunk, min(k, len(chunk)))
            I = np.where(I >= 0, I + int(offsets[si]) + i, -1)
            if D.shape[1] < k:
                D = np.pad(D, ((0, 0), (0, k - D.shape[1])), constant_values=np.inf)
                I = np.pad(I, ((0, 0), (0, k - I.shape[1])), constant_values=-1)
            heap.add_result(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64))
            bar.update(len(chunk))
    bar.close()
    heap.finalize()
    gid = heap.I
    shard = np.where(gid >= 0, np.searchsorted(offsets, gid, side="right") - 1, -1)
    row = np.where(gid >= 0, gid - offsets[np.clip(shard, 0, len(offsets) - 1)], -1)
    return heap.D, shard, row


def recall_at_k(found_shard: np.ndarray, found_row: np.ndarray, true_shard: np.ndarray, true_row: np.ndarray,
                k: int) -> float:
    """Mean over queries of |found top-k ∩ exact top-k| / |exact top-k| (entries named by (shard, row))."""
    hits, want = 0, 0
    for fs, fr, ts, tr in zip(found_shard[:, :k], found_row[:, :k], true_shard[:, :k], true_row[:, :k]):
        truth = {(int(s), int(r)) for s, r in zip(ts, tr) if r >= 0}
        got = {(int(s), int(r)) for s, r in zip(fs, fr) if r >= 0}
        hits += len(truth & got)
        want += len(truth)
    return hits / want if want else 1.0
