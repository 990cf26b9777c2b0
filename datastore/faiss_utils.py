"""FAISS helpers used by the store, its compaction and the research harness (in the spirit of FAISS's
`contrib/`): thin functions over index_factory indexes, no index code of our own."""

from __future__ import annotations

import hashlib
import threading
import weakref

import faiss
import numpy as np

from .format import DatastoreError

_GPU_RES = None


def ivf_of(index: faiss.Index):
    """The IVF index inside `index` (through wrappers such as IndexPreTransform), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


_COARSE_IDS: "weakref.WeakKeyDictionary[faiss.Index, str | None]" = weakref.WeakKeyDictionary()
_COARSE_LOCK = threading.Lock()


def coarse_identity(index: faiss.Index) -> str | None:
    """A digest of the coarse quantizer of `index` when `index` itself is an IVF index on the CPU (None
    otherwise). Shards with equal digests assign every query to the same lists, so one coarse search can
    serve them all (`Datastore.search`). The digest covers the quantizer's whole serialisation (centroids,
    and an HNSW quantizer's graph, which decides its approximate answers), not only its size. It is
    computed once per index object (remembered while the object lives), so it always describes the index
    a shard holds now, also after a caller swaps that index."""
    with _COARSE_LOCK:
        if index in _COARSE_IDS:
            return _COARSE_IDS[index]
    top = faiss.downcast_index(index)
    digest = None
    if isinstance(top, faiss.IndexIVF):
        try:
            blob = faiss.serialize_index(top.quantizer)
        except RuntimeError:  # a quantizer FAISS cannot write: never shared
            blob = None
        if blob is not None:
            h = hashlib.blake2b(blob.data, digest_size=16)
            h.update(f"{top.nlist}:{top.d}:{top.metric_type}".encode())
            digest = h.hexdigest()
    with _COARSE_LOCK:
        _COARSE_IDS[index] = digest
    return digest


def to_gpu(index: faiss.Index) -> faiss.Index:
    if not hasattr(faiss, "StandardGpuResources"):
        raise DatastoreError("index.device is 'cuda' but this faiss has no GPU support; "
                             "install faiss-gpu-cu12 instead of faiss-cpu")
    global _GPU_RES
    if _GPU_RES is None:
        _GPU_RES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RES, 0, index)


def search_params(index: faiss.Index, nprobe: int, dead_ids: np.ndarray | None = None):
    """Search parameters for `index`: IVF nprobe, and an IDSelector hiding `dead_ids` (tombstones).

    Returns (params or None, keep-alive): the selector points into the id buffer, which the caller must
    keep referenced as long as the params are used."""
    sel, buf = None, None
    if dead_ids is not None and len(dead_ids):
        buf = np.ascontiguousarray(dead_ids, dtype=np.int64)
        sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(buf), faiss.swig_ptr(buf)))
    if ivf_of(index) is not None:
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if sel else faiss.SearchParametersIVF(nprobe=nprobe)
    elif sel is not None:
        params = faiss.SearchParameters(sel=sel)
    else:
        params = None
    return params, (buf, sel)


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The stored vectors of an exact L2 flat index as a read-only [n, d] view, or None for other indexes."""
    flat = faiss.downcast_index(index)
    if not isinstance(flat, faiss.IndexFlat) or index.metric_type != faiss.METRIC_L2:
        return None
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def flat_subset(index: faiss.Index, rows: np.ndarray) -> faiss.Index | None:
    """A new exact index of `rows` of a flat L2 index (None when `index` is not one). Searching a subset
    this way keeps FAISS's BLAS path, which an IDSelector on the full index loses."""
    xb = flat_vectors(index)
    if xb is None:
        return None
    sub = faiss.IndexFlatL2(index.d)
    for i in range(0, len(rows), 65536):
        sub.add(np.ascontiguousarray(xb[rows[i:i + 65536]]))
    return sub


def compact_index(index: faiss.Index, keep: np.ndarray) -> faiss.Index:
    """A new index holding only the rows where `keep` is True, renumbered so FAISS id == new row.

    Flat-like indexes: ``remove_ids`` shifts the remaining vectors down, which is exactly that
    renumbering (order kept). IVF indexes store ids explicitly and ``remove_ids`` would leave gaps, so we
    rebuild the inverted lists: copy each list's codes as they are (no re-encoding, so search results for
    the kept entries are bit-identical) with ids remapped old -> new. Indexes that support neither are
    rebuilt from reconstructed vectors.
    """
    keep = np.asarray(keep, dtype=bool)
    if len(keep) != index.ntotal:
        raise DatastoreError(f"compact_index: keep mask has {len(keep)} rows, index {index.ntotal}")
    new_id = np.full(len(keep), -1, dtype=np.int64)
    new_id[keep] = np.arange(int(keep.sum()), dtype=np.int64)
    ivf = ivf_of(index)
    if ivf is not None:
        out = faiss.clone_index(index)
        out.reset()
        ivf_out = faiss.extract_index_ivf(out)
        inv = ivf.invlists
        cs = inv.code_size
        total = 0
        for lst in range(ivf.nlist):
            n = inv.list_size(lst)
            if n == 0:
                continue
            ids_ptr, codes_ptr = inv.get_ids(lst), inv.get_codes(lst)
            ids = faiss.rev_swig_ptr(ids_ptr, n).copy()
            codes = faiss.rev_swig_ptr(codes_ptr, n * cs).copy().reshape(n, cs)
            inv.release_ids(lst, ids_ptr)
            inv.release_codes(lst, codes_ptr)
            mapped = new_id[ids]
            sel = mapped >= 0
            m = int(sel.sum())
            if m:
                nid = np.ascontiguousarray(mapped[sel])
                ncodes = np.ascontiguousarray(codes[sel])
                ivf_out.invlists.add_entries(lst, m, faiss.swig_ptr(nid), faiss.swig_ptr(ncodes))
                total += m
        ivf_out.ntotal = total
        out.ntotal = total  # a wrapper (e.g. IndexPreTransform) keeps its own count
        return out
    dead = np.flatnonzero(~keep).astype(np.int64)
    out = faiss.clone_index(index)
    if len(dead) == 0:
        return out
    try:
        removed = out.remove_ids(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(dead)))
        if removed == len(dead) and out.ntotal == int(keep.sum()):
            return out
    except RuntimeError:
        pass
    vecs = index.reconstruct_n(0, index.ntotal)[keep]
    out = faiss.clone_index(index)
    out.reset()
    if len(vecs):
        out.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return out
