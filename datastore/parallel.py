"""Searching the shards of a store at the same time.

FAISS releases the GIL while it searches, so one thread per shard runs the shards' searches in
parallel; each thread does exactly the search the sequential loop would do, and the caller merges the
per-shard results in shard order, so the merged neighbours are identical to the sequential ones (a
test checks it bit for bit). A thread pool is used rather than FAISS ``IndexShards`` because every shard
carries its own search parameters (its tombstone selector, nprobe).

One shared pool per process; `max_workers` defaults to the CPUs. Small searches on a single shard, or on a
store with one shard, skip the pool. Each pool thread runs FAISS single-threaded (OpenMP's thread count is
a per-thread setting, so the caller's own searches keep theirs): the parallelism is across shards, and
FAISS's own threads on top of one thread per shard oversubscribe the cores (8 queries, k 1,024, two shards
on 2 cores: 7.6 ms with both kinds of threads, 6.9 ms with one FAISS thread per pool thread, 5.7 ms one
shard after the other, which is why `Datastore.search` keeps small searches off the pool).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            workers = int(os.environ.get("SILO_SEARCH_THREADS", "0")) or max(2, os.cpu_count() or 2)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="silo-shard-search",
                                       initializer=_one_faiss_thread)
        return _POOL


def _one_faiss_thread() -> None:
    import faiss

    faiss.omp_set_num_threads(1)


def map_shards(fn: Callable[[int, T], R], shards: Sequence[T], parallel: bool = True) -> list[R]:
    """[fn(i, shard) for each shard], run on the shared pool when `parallel` and there are several shards;
    results in shard order either way. An exception in any shard is raised here."""
    if not parallel or len(shards) < 2:
        return [fn(i, s) for i, s in enumerate(shards)]
    futures = [_pool().submit(fn, i, s) for i, s in enumerate(shards)]
    return [f.result() for f in futures]
