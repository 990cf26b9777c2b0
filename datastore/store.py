"""The sharded kNN datastore: on-disk format, build, open and search.

Layout (see README "On-disk formats")::

    store/
      manifest.json      format, generation, model fingerprint, key dim, index spec, shards[]
      quantizer.faiss    trained once (IVF/PQ), shared by every shard; absent for flat stores
      shards/<dir>/      one owner's (or domain's) entries
        index.faiss      keys; the FAISS id of an entry is its row in entries.npy
        entries.npy      per entry: next token, document index, token position, sentence index
        documents.jsonl  the shard's documents: id, owner, licence, title, sentence spans, text
        shard.json       counts, checksums, created, built-from config
      journal.jsonl      append-only, hash-chained log of builds and removals

`manifest.json` is only ever replaced whole (write temp, fsync, rename), so readers see the old store or
the new one. A `Datastore` object is an immutable snapshot of one manifest generation: searches never
see a half-applied change, and a writer publishes a new generation that the server swaps in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from silo.training.config import StageConfig
from silo.training.corpus import Document, load_documents

from .journal import append_journal
from .keys import KeyExtractor
from .sentences import sentence_of_offsets, sentence_spans

FORMAT = "silo.datastore.v1"
ENTRY_DTYPE = np.dtype([("token", "<i4"), ("doc", "<i4"), ("pos", "<i4"), ("sent", "<i4")])


class DatastoreError(RuntimeError):
    """A store is missing, malformed, or used wrongly; the message names the path."""


class ShardMissing(DatastoreError):
    """A shard file named by the manifest is gone: the store is damaged, or a removal deleted the folder
    between our reading the manifest and loading the shard (then the next manifest read no longer names it)."""


class FingerprintMismatch(DatastoreError):
    """The store's keys were made by a different model than the one it is being attached to."""


class IndexSpec(StageConfig):
    factory: str = "Flat"  # any FAISS index_factory string: Flat, SQfp16, IVF1024,PQ32, IVF256,SQ8 ...
    nprobe: int = Field(16, gt=0)  # IVF lists visited per query
    train_sample: int = Field(200_000, gt=0)  # keys sampled to train an IVF/PQ quantizer
    device: Literal["cpu", "cuda"] = "cpu"


class DatastoreConfig(StageConfig):
    model: str  # HF model folder or hub id; its fingerprint is written into the manifest
    corpus: list[str] = Field(min_length=1)
    domains: list[str] | None = None
    output_dir: str
    shard_by: Literal["owner", "domain"] = "owner"
    # keep whole documents, in corpus order, until a shard holds this many characters; None keeps
    # all. Lets the demo and quick experiments use a slice of a corpus without writing a new one.
    max_chars_per_shard: int | None = Field(None, gt=0)
    index: IndexSpec = IndexSpec()
    window: int = Field(256, gt=1)
    stride: int = Field(192, gt=0)
    batch_size: int = Field(16, gt=0)
    overwrite: bool = False
    threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride > self.window:
            raise ValueError(f"stride ({self.stride}) must not exceed window ({self.window})")
        return self


# --------------------------------------------------------------------------------------------- files

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes renames and new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write temp -> fsync -> rename -> fsync folder: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / "manifest.json"
    if not mpath.exists():
        raise DatastoreError(f"{path}: not a datastore (no manifest.json); build one with `silo datastore build`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatastoreError(f"{mpath}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise DatastoreError(f"{mpath}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return s or "unnamed"


# --------------------------------------------------------------------------------------------- shards

@dataclass
class Shard:
    """One loaded shard: its index, entries and documents (read-only)."""

    name: str
    owner: str
    dir: Path
    index: faiss.Index
    entries: np.ndarray
    documents: list[dict]
    removed_docs: frozenset[int] = frozenset()
    _params: object = None
    live_entries: int = 0

    @classmethod
    def load(cls, store_dir: Path, rec: dict, device: str = "cpu") -> "Shard":
        d = store_dir / rec["dir"]
        for f in ("index.faiss", "entries.npy", "documents.jsonl"):
            if not (d / f).exists():
                raise ShardMissing(f"{d / f}: missing; the store is damaged (shard {rec['name']})")
        index = faiss.read_index(str(d / "index.faiss"))
        if device == "cuda":
            index = _to_gpu(index)
        entries = np.load(d / "entries.npy", mmap_mode="r")
        if index.ntotal != len(entries):
            raise DatastoreError(f"{d}: index holds {index.ntotal} keys but entries.npy {len(entries)} rows")
        with open(d / "documents.jsonl", encoding="utf-8") as fh:
            documents = [json.loads(line) for line in fh if line.strip()]
        return cls(name=rec["name"], owner=rec["owner"], dir=d, index=index, entries=entries, documents=documents)

    def with_removed(self, removed: frozenset[int], nprobe: int) -> "Shard":
        """A view of this shard that hides the entries of `removed` documents (tombstones)."""
        view = Shard(self.name, self.owner, self.dir, self.index, self.entries, self.documents, removed)
        sel = None
        if removed:
            dead = np.flatnonzero(np.isin(self.entries["doc"], np.fromiter(removed, dtype=np.int64)))
            view._dead = dead.astype(np.int64)  # kept alive: the selector points into this buffer
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(view._dead)))
            view._sel = sel
            view.live_entries = len(self.entries) - len(dead)
        else:
            view.live_entries = len(self.entries)
        ivf = _ivf_of(self.index)
        if ivf is not None:
            view._params = faiss.SearchParametersIVF(nprobe=nprobe, sel=sel) if sel else faiss.SearchParametersIVF(nprobe=nprobe)
        elif sel is not None:
            view._params = faiss.SearchParameters(sel=sel)
        return view

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._params is not None:
            return self.index.search(queries, k, params=self._params)
        return self.index.search(queries, k)


def _ivf_of(index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _to_gpu(index):
    if not hasattr(faiss, "StandardGpuResources"):
        raise DatastoreError("index.device is 'cuda' but this faiss has no GPU support; "
                             "install faiss-gpu-cu12 instead of faiss-cpu")
    global _GPU_RES
    try:
        _GPU_RES
    except NameError:
        _GPU_RES = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_GPU_RES, 0, index)


@dataclass
class Neighbors:
    """Merged top-k over all shards. Missing neighbours have token -1 and distance +inf."""

    distances: np.ndarray  # [n, k] float32, squared L2
    tokens: np.ndarray  # [n, k] int32
    shard: np.ndarray  # [n, k] int16, index into Datastore.shards
    ids: np.ndarray  # [n, k] int64, row within the shard

    def truncate(self, k: int) -> "Neighbors":
        return Neighbors(self.distances[:, :k], self.tokens[:, :k], self.shard[:, :k], self.ids[:, :k])


# --------------------------------------------------------------------------------------------- store

@dataclass
class Datastore:
    """An immutable snapshot of one generation of a store."""

    path: Path
    manifest: dict
    shards: list[Shard]
    device: str = "cpu"
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None, device: str = "cpu",
             reuse: "Datastore | None" = None) -> "Datastore":
        """Open the current generation. With `fingerprint`, refuse a store built for another model.

        `reuse` is a previously opened snapshot: shards whose folder did not change are shared with it
        instead of being read again, so picking up a removal costs only what changed.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if fingerprint is not None and manifest["model"]["fingerprint"] != fingerprint:
            raise FingerprintMismatch(
                f"{path}: the store was built for model {manifest['model']['fingerprint'][:23]}... "
                f"({manifest['model'].get('path', '?')}) but the model given is {fingerprint[:23]}...; "
                "keys from one model are meaningless for another: rebuild the store with `silo datastore build`"
            )
        nprobe = manifest["index"].get("nprobe", 16)
        loaded = dict(reuse._cache) if reuse is not None and reuse.path == path else {}
        shards, cache = [], {}
        for rec in manifest["shards"]:
            base = loaded.get(rec["dir"]) or Shard.load(path, rec, device)
            cache[rec["dir"]] = base
            shards.append(base.with_removed(frozenset(rec.get("removed_docs", [])), nprobe))
        return cls(path=path, manifest=manifest, shards=shards, device=device, _cache=cache)

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def key_dim(self) -> int:
        return int(self.manifest["model"]["key_dim"])

    @property
    def num_entries(self) -> int:
        return sum(s.live_entries for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> Neighbors:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.key_dim:
            raise DatastoreError(f"queries must be [n, {self.key_dim}], got {list(q.shape)}")
        n = len(q)
        ds, ts, ss, ids = [], [], [], []
        for si, shard in enumerate(self.shards):
            kk = min(k, shard.live_entries)
            if kk <= 0:
                continue
            D, I = shard.search(q, kk)
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

    def entry_info(self, shard_index: int, entry_id: int) -> dict:
        """Provenance of one entry: owner, document, licence and the sentence it belongs to."""
        shard = self.shards[shard_index]
        e = shard.entries[entry_id]
        doc = shard.documents[int(e["doc"])]
        a, b = doc["sentences"][int(e["sent"])] if doc["sentences"] else (0, 0)
        return {
            "shard": shard.name, "owner": doc["owner"], "doc_index": int(e["doc"]), "document_id": doc["id"],
            "title": doc.get("title", ""), "license": doc.get("license", ""), "sentence_index": int(e["sent"]),
            "sentence": doc["text"][a:b], "token": int(e["token"]),
        }

    def document(self, shard_index: int, doc_index: int) -> dict:
        return self.shards[shard_index].documents[doc_index]

    def summary(self) -> dict:
        return {
            "path": str(self.path), "generation": self.generation, "fingerprint": self.fingerprint,
            "index": self.manifest["index"]["factory"], "entries": self.num_entries,
            "shards": [{"name": s.name, "owner": s.owner, "entries": s.live_entries,
                        "documents": len(s.documents) - len(s.removed_docs)} for s in self.shards],
        }


# --------------------------------------------------------------------------------------------- build

def load_lm(name_or_path: str, device: str = "cpu"):
    """Load a HF causal LM and its tokenizer (a hub id or a local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path)
    except OSError as exc:
        raise DatastoreError(f"cannot load model '{name_or_path}': {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _group_documents(docs: list[Document], shard_by: str) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for d in docs:
        key = d.owner if shard_by == "owner" else (d.domain or "default")
        groups.setdefault(key, []).append(d)
    return groups


def build_datastore(cfg: DatastoreConfig, progress: bool = True, config_source: str = "") -> Datastore:
    """Build a store from a corpus and a model; the finished store replaces `output_dir` atomically."""
    import torch

    from silo.training.fingerprint import model_fingerprint

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if (out / "manifest.json").exists() and not cfg.overwrite:
        raise DatastoreError(f"{out} already holds a store; pass --overwrite (datastore.overwrite: true) to replace it")
    if out.exists() and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise DatastoreError(f"{out} exists and is not a datastore; choose an empty or new output_dir")
    model, tokenizer = load_lm(cfg.model, "cuda" if cfg.index.device == "cuda" else "cpu")
    fp = model_fingerprint(model, tokenizer)
    docs = load_documents(cfg.corpus, cfg.domains)
    if not docs:
        raise DatastoreError(f"datastore.corpus: no documents in {cfg.corpus} (domains {cfg.domains})")
    groups = _group_documents(docs, cfg.shard_by)
    if cfg.max_chars_per_shard:
        groups = {k: _first_chars(v, cfg.max_chars_per_shard) for k, v in groups.items()}

    tmp = out.with_name(f".{out.name}.tmp-build-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "shards").mkdir(parents=True)
    extractor = KeyExtractor(model, tokenizer, cfg.window, cfg.stride, cfg.batch_size)
    key_dim = model.get_output_embeddings().in_features
    t0 = time.time()
    total_chars = sum(len(d.text) for d in docs)
    bar = tqdm(total=total_chars, desc="datastore: encoding", unit="char", unit_scale=True,
               disable=not progress or None)
    shard_recs = []
    for key, group in groups.items():
        name = slug(key)
        sdir = tmp / "shards" / name
        sdir.mkdir()
        entry_parts, doc_recs = [], []
        with open(sdir / "keys.f32", "wb") as kf:
            for dk in extractor.iter_documents([d.text for d in group]):
                doc = group[dk.doc_index]
                spans = sentence_spans(doc.text)
                sent = np.asarray(sentence_of_offsets(spans, dk.char_offsets.tolist()), dtype=np.int32)
                rows = np.empty(len(dk.keys), dtype=ENTRY_DTYPE)
                rows["token"], rows["doc"], rows["pos"], rows["sent"] = dk.next_tokens, dk.doc_index, dk.positions, sent
                entry_parts.append(rows)
                kf.write(dk.keys.tobytes())
                doc_recs.append({"index": dk.doc_index, "id": doc.id, "owner": doc.owner, "license": doc.license,
                                 "tier": doc.tier, "title": doc.title, "source": doc.source, "url": doc.url,
                                 "domain": doc.domain, "sha256": doc.sha256, "tokens": int(len(dk.keys)),
                                 "sentences": [list(s) for s in spans], "text": doc.text})
                bar.update(len(doc.text))
        entries = np.concatenate(entry_parts) if entry_parts else np.zeros(0, ENTRY_DTYPE)
        np.save(sdir / "entries.npy", entries)
        with open(sdir / "documents.jsonl", "w", encoding="utf-8") as fh:
            for rec in doc_recs:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        shard_recs.append({"name": name, "owner": key if cfg.shard_by == "owner" else "", "dir": f"shards/{name}",
                           "entries": int(len(entries)), "documents": len(doc_recs)})
    bar.close()
    encode_s = time.time() - t0
    n_total = sum(r["entries"] for r in shard_recs)

    # Index: train the quantizer once on a sample of all keys, then fill one index per shard.
    t1 = time.time()
    probe = faiss.index_factory(key_dim, cfg.index.factory, faiss.METRIC_L2)
    trained = None
    if not probe.is_trained:
        sample = _sample_keys(tmp, shard_recs, key_dim, cfg.index.train_sample, seed=0)
        if len(sample) < 2:
            raise DatastoreError("too few keys to train the index quantizer")
        if progress:
            print(f"training index {cfg.index.factory} on {len(sample):,} sampled keys")
        probe.train(sample)
        faiss.write_index(probe, str(tmp / "quantizer.faiss"))
        trained = tmp / "quantizer.faiss"
    for rec in tqdm(shard_recs, desc="datastore: indexing", unit="shard", disable=not progress or None):
        sdir = tmp / rec["dir"]
        index = faiss.read_index(str(trained)) if trained else faiss.index_factory(key_dim, cfg.index.factory, faiss.METRIC_L2)
        keys = np.memmap(sdir / "keys.f32", dtype=np.float32, mode="r").reshape(-1, key_dim)
        for i in range(0, len(keys), 65536):
            index.add(np.ascontiguousarray(keys[i:i + 65536]))
        del keys
        faiss.write_index(index, str(sdir / "index.faiss"))
        (sdir / "keys.f32").unlink()
        info = {"name": rec["name"], "owner": rec["owner"], "entries": rec["entries"], "documents": rec["documents"],
                "created": _now(), "key_dim": key_dim, "index_factory": cfg.index.factory,
                "checksums": {f: sha256_file(sdir / f) for f in ("index.faiss", "entries.npy", "documents.jsonl")},
                "built_from": {"corpus": cfg.corpus, "domains": cfg.domains, "window": cfg.window,
                               "stride": cfg.stride}}
        write_json_atomic(sdir / "shard.json", info)
        rec["checksum"] = sha256_file(sdir / "shard.json")
    index_s = time.time() - t1

    manifest = {
        "format": FORMAT, "generation": 1, "created": _now(), "updated": _now(),
        "model": {"fingerprint": fp, "path": cfg.model, "key_dim": key_dim, "vocab_size": len(tokenizer)},
        "index": {"factory": cfg.index.factory, "metric": "l2", "nprobe": cfg.index.nprobe,
                  "quantizer": "quantizer.faiss" if trained else None},
        "build": {"window": cfg.window, "stride": cfg.stride, "config_source": config_source,
                  "config": cfg.model_dump(exclude={"overwrite"}),
                  "encode_seconds": round(encode_s, 2), "index_seconds": round(index_s, 2)},
        "shards": shard_recs,
    }
    write_json_atomic(tmp / "manifest.json", manifest)
    if (out / "journal.jsonl").exists():  # a rebuild keeps the history of the store it replaces
        shutil.copy2(out / "journal.jsonl", tmp / "journal.jsonl")
    append_journal(tmp / "journal.jsonl", "build", generation=1, entries=n_total,
                   shards=[{"name": r["name"], "entries": r["entries"], "checksum": r["checksum"]} for r in shard_recs],
                   fingerprint=fp, index=cfg.index.factory)
    _swap_in(tmp, out)
    if progress:
        print(f"datastore: {n_total:,} entries in {len(shard_recs)} shard(s) at {out} "
              f"(encode {encode_s:.1f}s, {n_total / max(encode_s, 1e-9):,.0f} keys/s; index {index_s:.1f}s)")
    return Datastore.open(out, fingerprint=fp, device=cfg.index.device)


def _first_chars(docs: list[Document], budget: int) -> list[Document]:
    kept, used = [], 0
    for d in docs:
        if kept and used + len(d.text) > budget:
            break
        kept.append(d)
        used += len(d.text)
    return kept


def _sample_keys(tmp: Path, shard_recs: list[dict], dim: int, n: int, seed: int) -> np.ndarray:
    total = sum(r["entries"] for r in shard_recs)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(total, size=min(n, total), replace=False))
    out, base = [], 0
    for rec in shard_recs:
        keys = np.memmap(tmp / rec["dir"] / "keys.f32", dtype=np.float32, mode="r").reshape(-1, dim)
        local = take[(take >= base) & (take < base + rec["entries"])] - base
        out.append(np.asarray(keys[local]))
        base += rec["entries"]
    return np.ascontiguousarray(np.concatenate(out))


def _swap_in(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_path(out.parent)
    if old.exists():
        shutil.rmtree(old)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
