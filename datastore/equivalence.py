"""Is a store, after removals, the store a build without the removed content makes? File by file.

`compare_stores(store, reference)` puts the two side by side: the manifests (model, index type, what the
quantizer was trained on, shards in order with their owners and counts, no tombstones left), the shared
quantizer, and every file of every shard, found by walking the folders (so a file a later version adds to
shards, such as another per-shard index, is compared too). Files with equal bytes are equal; for the
others a comparer by name says what differs and by how much (rows of entries or keys, a key's largest
change, inverted lists whose codes differ, documents, blocks), so a difference can be explained or fixed.
What is not content is left out on purpose: shard.json's timestamps and provenance (its counts are
compared), blocks.json's timestamps and the shard checksum it is tied to, and the store's history
(journal, removal records, receipts), which a rebuild carries over.

The model's side of the check (search results for probe queries, next-token distributions) needs the LM:
`silo.workflows.exactness`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from .faiss_utils import ivf_of
from .format import Manifest, parse_document

# shard.json and blocks.json keys that record when and from where, not what (they differ between any two
# builds); the rest of each is compared
VOLATILE = frozenset({"created", "compacted", "compacted_from", "removed_documents", "reindexed", "reindexed_from",
                      "checksums", "seconds", "shard_checksum", "built_from"})
HISTORY = ("journal.jsonl", "removals", "receipts", ".removal.lock")


@dataclass(frozen=True)
class Difference:
    """One way the store differs from the reference: where (a file, relative to the store), what, and how much
    (`size`: a count or the largest numeric change, in the unit `what` names). `explained`: why it is no
    difference in content (float rounding of a re-embedding); an unexplained difference fails the check."""

    where: str
    what: str
    size: float | None = None
    explained: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class StoreComparison:
    """The result of `compare_stores`: counts of what was compared and every difference found."""

    store: str
    reference: str
    shards: int
    entries: int
    files_compared: int
    files_identical: int
    differences: tuple[Difference, ...] = field(default_factory=tuple)

    @property
    def equal(self) -> bool:
        return all(d.explained for d in self.differences)

    def to_json(self) -> dict:
        return {"store": self.store, "reference": self.reference, "equal": self.equal, "shards": self.shards,
                "entries": self.entries, "files_compared": self.files_compared,
                "files_identical": self.files_identical, "differences": [d.to_json() for d in self.differences]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ comparers

def _rows(a: np.ndarray, b: np.ndarray) -> tuple[str, float]:
    if a.shape != b.shape:
        return f"shape {list(a.shape)} against {list(b.shape)}", None
    if a.dtype.names:
        diff = np.zeros(len(a), bool)
        for name in a.dtype.names:
            diff |= a[name] != b[name]
        return "rows that differ", float(diff.sum())
    rows = (a != b).reshape(len(a), -1).any(axis=1) if a.ndim > 1 else a != b
    gap = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0
    return f"{int(rows.sum())} rows differ; largest change", gap


def _npy(a: Path, b: Path) -> tuple[str, float | None]:
    return _rows(np.load(a, mmap_mode="r"), np.load(b, mmap_mode="r"))


def _documents(a: Path, b: Path) -> tuple[str, float | None]:
    def read(p: Path) -> list[dict]:
        with open(p, encoding="utf-8") as fh:
            return [parse_document(line, f"{p}:{n}").to_json() for n, line in enumerate(fh, 1) if line.strip()]

    da, db = read(a), read(b)
    if [d["id"] for d in da] != [d["id"] for d in db]:
        only = sorted({d["id"] for d in da} ^ {d["id"] for d in db})
        return f"other documents or order (ids in one only: {', '.join(only[:5]) or 'none'})", float(len(only))
    fields = sorted({k for x, y in zip(da, db) for k in x if x.get(k) != y.get(k)})
    return f"documents differ in {', '.join(fields)}", float(sum(x != y for x, y in zip(da, db)))


def _json_lines(a: Path, b: Path) -> tuple[str, float | None]:
    def read(p: Path) -> list:
        with open(p, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    ra, rb = read(a), read(b)
    if len(ra) != len(rb):
        return f"{len(ra)} lines against {len(rb)}", float(abs(len(ra) - len(rb)))
    return "lines that differ", float(sum(x != y for x, y in zip(ra, rb)))


def _json_content(a: Path, b: Path) -> tuple[str, float | None] | None:
    """None when the two JSON files say the same apart from `VOLATILE` keys."""
    def read(p: Path) -> dict:
        data = json.loads(p.read_text(encoding="utf-8"))
        return {k: v for k, v in data.items() if k not in VOLATILE} if isinstance(data, dict) else data

    ja, jb = read(a), read(b)
    if ja == jb:
        return None
    keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)) if isinstance(ja, dict) else []
    return f"settings differ: {', '.join(keys) or 'content'}", None


def _index(a: Path, b: Path) -> tuple[str, float | None]:
    """What differs between two FAISS indexes: their size, the coarse quantizer, codes in inverted lists, or
    (flat-like indexes) the stored vectors."""
    ia, ib = faiss.read_index(str(a)), faiss.read_index(str(b))
    if ia.ntotal != ib.ntotal:
        return f"{ia.ntotal} entries against {ib.ntotal}", float(abs(ia.ntotal - ib.ntotal))
    va, vb = ivf_of(ia), ivf_of(ib)
    if va is not None and vb is not None:
        qa, qb = faiss.serialize_index(va.quantizer), faiss.serialize_index(vb.quantizer)
        if not np.array_equal(qa, qb):
            return "another coarse quantizer (centroids trained on other keys)", None
        lists = sum(_ivf_list(va, vb, lst) for lst in range(va.nlist))
        return ("inverted lists whose ids or codes differ" if lists else "serialised differently (same lists, codes "
                "and ids)"), float(lists)
    try:
        return "stored vectors differ; largest change", float(np.abs(ia.reconstruct_n(0, ia.ntotal)
                                                                   - ib.reconstruct_n(0, ib.ntotal)).max())
    except RuntimeError:
        return "bytes differ (an index type that cannot be read back vector by vector)", None


def _ivf_list(va, vb, lst: int) -> int:
    """1 if inverted list `lst` holds other ids or codes in the two indexes, else 0."""
    out = []
    for ivf in (va, vb):
        inv = ivf.invlists
        n = inv.list_size(lst)
        ids_ptr, codes_ptr = inv.get_ids(lst), inv.get_codes(lst)
        out.append((faiss.rev_swig_ptr(ids_ptr, n).copy(), faiss.rev_swig_ptr(codes_ptr, n * inv.code_size).copy()))
        inv.release_ids(lst, ids_ptr)
        inv.release_codes(lst, codes_ptr)
    (ia, ca), (ib, cb) = out
    return int(not (np.array_equal(ia, ib) and np.array_equal(ca, cb)))


def _bytes(a: Path, b: Path) -> tuple[str, float | None]:
    return "bytes differ", None


COMPARERS: dict[str, Callable[[Path, Path], tuple[str, float | None]]] = {
    "entries.npy": _npy, "keys.npy": _npy, "sentences.npy": _npy, "documents.jsonl": _documents,
    "index.faiss": _index, "dense.faiss": _index, "blocks.jsonl": _json_lines,
}


# RIC blocks' dense vectors: compaction filters the stored vectors, a build embeds the kept blocks again in other
# batches (sentence-transformers pads each batch to its longest block), which moves a vector by float rounding
DENSE_ROUNDING = 1e-5


def _compare_file(rel: str, a: Path, b: Path) -> Difference | None:
    name = Path(rel).name
    if name in ("shard.json", "blocks.json"):
        found = _json_content(a, b)
        return None if found is None else Difference(rel, *found)
    if _sha256(a) == _sha256(b):
        return None
    what, size = COMPARERS.get(name, _bytes)(a, b)
    explained = None
    if name == "dense.faiss" and size is not None and "vectors" in what and size <= DENSE_ROUNDING:
        explained = (f"the reference embedded the same blocks in other batches: float rounding, at most "
                     f"{DENSE_ROUNDING:g} per component")
    return Difference(rel, what, size, explained)


# ------------------------------------------------------------------------------------------ stores

def _manifest_differences(ma: Manifest, mb: Manifest) -> list[Difference]:
    out = []
    if ma.model.fingerprint != mb.model.fingerprint:
        out.append(Difference("manifest.json", "built with another model (fingerprint)"))
    for key in ("factory", "metric", "nprobe", "trained_on", "train_corpus", "train_sample"):
        if getattr(ma.index, key) != getattr(mb.index, key):
            out.append(Difference("manifest.json", f"index.{key}: {getattr(ma.index, key)!r} against "
                                                   f"{getattr(mb.index, key)!r}"))
    shards_a = [(r.name, r.owner, r.entries, r.documents) for r in ma.shards]
    shards_b = [(r.name, r.owner, r.entries, r.documents) for r in mb.shards]
    if shards_a != shards_b:
        out.append(Difference("manifest.json", f"shards (name, owner, entries, documents) {shards_a} against "
                                               f"{shards_b}"))
    tomb = sum(len(r.removed_docs) for r in ma.shards)
    if tomb:
        out.append(Difference("manifest.json", "tombstoned documents not compacted yet", float(tomb)))
    return out


def _quantizer_difference(a: Path, ma: Manifest, b: Path, mb: Manifest) -> Difference | None:
    qa, qb = ma.index.quantizer, mb.index.quantizer
    if qa is None and qb is None:
        return None
    if qa is None or qb is None or _sha256(a / qa) != _sha256(b / qb):
        note = ("; trained on keys sampled across the store: the removed keys are in it until it is retrained"
                if ma.index.trained_on == "store" else "")
        return Difference(qa or "quantizer", f"another quantizer than the reference's{note}")
    return None


def compare_stores(store: str | Path, reference: str | Path) -> StoreComparison:
    """Compare `store` with `reference` (built without the removed content, same config): see the module
    docstring. Reads every file of both."""
    a, b = Path(store), Path(reference)
    ma, mb = Manifest.read(a), Manifest.read(b)
    diffs = _manifest_differences(ma, mb)
    q = _quantizer_difference(a, ma, b, mb)
    diffs += [q] if q else []
    compared = identical = 0
    ref_shards = {r.name: r for r in mb.shards}
    for rec in ma.shards:
        other = ref_shards.get(rec.name)
        if other is None:
            continue  # named in the manifest difference
        fa, fb = _files(a / rec.dir), _files(b / other.dir)
        prefix = f"shards/{rec.name}/"
        for rel in sorted(set(fa) ^ set(fb)):
            diffs.append(Difference(prefix + rel, "only in the store" if rel in fa else "only in the reference"))
        for rel in sorted(set(fa) & set(fb)):
            compared += 1
            d = _compare_file(prefix + rel, fa[rel], fb[rel])
            identical += d is None
            diffs += [d] if d else []
    gate_a, gate_b = a / "gate.json", b / "gate.json"
    if gate_a.exists() != gate_b.exists() or (gate_a.exists() and _sha256(gate_a) != _sha256(gate_b)):
        diffs.append(Difference("gate.json", "another mixture gate (or none) than the reference's"))
    return StoreComparison(str(a), str(b), len(ma.shards), sum(r.entries for r in ma.shards), compared, identical,
                           tuple(diffs))
