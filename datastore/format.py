"""The datastore's on-disk format: names, dtypes, errors, the typed manifest and the stored document.

Layout (see README "On-disk formats")::

    store/
      manifest.json      format, generation, model fingerprint, key dim, index spec, shards[]
      quantizer.faiss    trained once (IVF/PQ), shared by every shard; absent for flat stores
      shards/<dir>/      one owner's (or domain's) entries: SHARD_FILES + shard.json (+ blocks/)
      journal.jsonl      append-only, hash-chained log of builds and removals

`manifest.json` is only ever replaced whole (`Manifest.write`: temp, fsync, rename). Records are typed
here and turned into JSON only when read from or written to the file; keys this version does not know
are kept (`extra`) so an older reader never drops what a newer writer recorded.
"""

from __future__ import annotations

import fcntl
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from silo.core.files import write_json_atomic

FORMAT = "silo.datastore.v1"
GATE_FILE = "gate.json"  # the mixture gate fitted for the store (its content belongs to silo.model.gate)
LOCK_FILE = ".removal.lock"
ENTRY_DTYPE = np.dtype([("token", "<i4"), ("doc", "<i4"), ("pos", "<i4"), ("sent", "<i4")])
SHARD_FILES = ("index.faiss", "entries.npy", "documents.jsonl")  # checksummed in shard.json
MANIFEST = "manifest.json"


class DatastoreError(RuntimeError):
    """A store is missing, malformed, or used wrongly; the message names the path."""


class ShardMissing(DatastoreError):
    """A shard file named by the manifest is gone: the store is damaged, or a removal deleted the folder
    between our reading the manifest and loading the shard (then the next manifest read no longer names it)."""


class StaleGeneration(DatastoreError):
    """A snapshot older than the one in use was offered for the same store: generations only move forward."""


class FingerprintMismatch(DatastoreError):
    """The store's keys were made by a different model than the one it is being attached to."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _split(cls, data: dict) -> tuple[dict, dict]:
    known = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in data.items() if k in known}, {k: v for k, v in data.items() if k not in known}


@dataclass
class ShardRecord:
    """One shard as the manifest lists it. `removed_docs`: tombstoned document indices (hidden from
    search until compaction rewrites the shard without them)."""

    name: str
    owner: str
    dir: str
    entries: int
    documents: int
    checksum: str | None = None  # sha256 of the shard's shard.json
    removed_docs: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "ShardRecord":
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    def to_json(self) -> dict:
        out = {"name": self.name, "owner": self.owner, "dir": self.dir, "entries": int(self.entries),
               "documents": int(self.documents), **self.extra}
        if self.checksum is not None:
            out["checksum"] = self.checksum
        if self.removed_docs:
            out["removed_docs"] = sorted(int(i) for i in self.removed_docs)
        return out


@dataclass(frozen=True)
class StoredDocument:
    """One line of a shard's documents.jsonl: a document as the store holds it.

    `index` is the document's place in its shard (entries.npy's ``doc`` column points here); `sentences`
    are (start, end) character spans of `text`, the units attribution quotes and lookup hashes; `tokens`
    is the number of entries the document contributed. Keys this version does not know are kept in
    `extra` and written back, so an older reader never drops what a newer writer recorded. Rows written
    by stores or tools that left optional fields out read with their defaults.
    """

    # fields in the order a row's keys are written (the order the build has always used)
    index: int
    id: str
    owner: str
    license: str = ""  # the SPDX expression the corpus gave
    tier: str = ""  # its licence tier when the store was built
    title: str = ""
    source: str = ""
    url: str = ""
    domain: str = ""
    sha256: str = ""  # of the text (a rebuild leaves out copies of removed documents by it)
    tokens: int = 0  # entries the document contributed
    sentences: tuple[tuple[int, int], ...] = ()
    text: str = ""  # required in a row (from_json checks it); last, as in the file
    extra: dict = field(default_factory=dict, hash=False)

    @classmethod
    def from_json(cls, data: dict) -> "StoredDocument":
        """A parsed documents.jsonl row; KeyError/TypeError/ValueError for a row that is not a document."""
        known, extra = _split(cls, data)
        for key in ("index", "id", "owner", "text"):
            if key not in known:
                raise KeyError(key)
        known["index"] = int(known["index"])
        known["tokens"] = int(known.get("tokens") or 0)
        known["sentences"] = tuple((int(a), int(b)) for a, b in known.get("sentences") or ())
        for key in ("license", "tier", "title", "source", "url", "domain", "sha256"):
            if known.get(key) is None:
                known.pop(key, None)  # null in the file: the default ("")
        return cls(**known, extra=extra)

    def to_json(self) -> dict:
        out = _flat(self)
        out["sentences"] = [[a, b] for a, b in self.sentences]
        return out

    def sentence(self, i: int) -> str:
        """The text of sentence `i` ("" for a document without sentence spans)."""
        a, b = self.sentences[i] if self.sentences else (0, 0)
        return self.text[a:b]


def parse_document(line: bytes | str, where: str) -> StoredDocument:
    """One documents.jsonl line as a StoredDocument; DatastoreError naming `where` when it is not one."""
    try:
        return StoredDocument.from_json(json.loads(line))
    except json.JSONDecodeError as exc:
        raise DatastoreError(f"{where}: not valid JSON ({exc.msg})") from None
    except KeyError as exc:
        raise DatastoreError(f"{where}: a stored document needs {exc.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise DatastoreError(f"{where}: not a stored document ({exc})") from None


@dataclass
class ModelRef:
    fingerprint: str
    path: str
    key_dim: int
    vocab_size: int
    extra: dict = field(default_factory=dict)


@dataclass
class IndexRef:
    factory: str
    metric: str = "l2"
    nprobe: int = 16
    quantizer: str | None = None  # "quantizer.faiss" when trained (IVF/PQ)
    mmap: bool = True  # readers map the shards (datastore/ondisk.py) unless they ask otherwise
    # what a trained quantizer was trained on (datastore/indexing.py): "store" (keys sampled across the
    # shards; a removal retrains it) or "corpus" (keys of `train_corpus`, text no store owner can withdraw)
    trained_on: str | None = None
    train_corpus: list[str] | None = None
    train_sample: int | None = None  # keys drawn to train it (seed indexing.TRAIN_SEED)
    trained_keys: str | None = None  # "store": digest of the shards' keys it was trained on (indexing.keys_digest)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = _flat(self)
        for key in ("trained_on", "train_corpus", "train_sample", "trained_keys"):
            if out[key] is None:
                del out[key]  # a flat store's manifest, or one written before these existed, reads the same
        return out

    @classmethod
    def from_json(cls, data: dict) -> "IndexRef":
        ref = _sub(cls, data)
        if ref.quantizer and ref.trained_on is None:
            ref.trained_on = "store"  # stores built before the field existed trained on their own keys
        return ref


def _sub(cls, data: dict):
    known, extra = _split(cls, data)
    return cls(**known, extra=extra)


def _flat(obj) -> dict:
    out = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name != "extra"}
    out.update(obj.extra)
    return out


@dataclass
class Manifest:
    """manifest.json: one generation of a store."""

    generation: int
    model: ModelRef
    index: IndexRef
    shards: list[ShardRecord]
    build: dict = field(default_factory=dict)  # window, stride, config, timings (free-form settings)
    created: str = ""
    updated: str = ""
    lineage: str = ""  # one id for every generation built at this path (kept by rebuilds)
    format: str = FORMAT
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict) -> "Manifest":
        known, extra = _split(cls, data)
        known["model"] = _sub(ModelRef, known["model"])
        known["index"] = IndexRef.from_json(known["index"])
        known["shards"] = [ShardRecord.from_json(r) for r in known["shards"]]
        return cls(**known, extra=extra)

    def to_json(self) -> dict:
        out = {"format": self.format, "generation": int(self.generation), "created": self.created,
               "updated": self.updated, "model": _flat(self.model), "index": self.index.to_json(),
               "build": self.build, "shards": [r.to_json() for r in self.shards], **self.extra}
        if self.lineage:
            out["lineage"] = self.lineage
        return out

    @classmethod
    def read(cls, store: str | Path) -> "Manifest":
        path = Path(store) / MANIFEST
        if not path.exists():
            raise DatastoreError(f"{store}: not a datastore (no manifest.json); build one with `silo datastore build`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatastoreError(f"{path}: not valid JSON ({exc})") from None
        if data.get("format") != FORMAT:
            raise DatastoreError(f"{path}: format {data.get('format')!r}, expected {FORMAT!r}")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError) as exc:
            raise DatastoreError(f"{path}: malformed manifest ({exc})") from None

    def write(self, store: str | Path) -> None:
        """Replace manifest.json whole (temp file, fsync, rename): readers see the old or the new one."""
        write_json_atomic(Path(store) / MANIFEST, self.to_json())

    def shard(self, name: str) -> ShardRecord | None:
        return next((r for r in self.shards if r.name == name), None)

    def next_generation(self) -> None:
        self.generation = int(self.generation) + 1
        self.updated = now()


@contextmanager
def store_lock(store: str | Path) -> Iterator[None]:
    """Exclusive lock on a store's mutations (removals, rebuilds, block builds): one writer at a time,
    across processes. A path that holds no store yet has nothing to lock."""
    path = Path(store)
    if not (path / MANIFEST).exists():
        yield
        return
    with open(path / LOCK_FILE, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
