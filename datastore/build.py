"""Build a store from a corpus and a model: keys for every position, one shard per owner (or domain),
one FAISS index per shard (a quantizer trained once and shared when the index type needs training).

The store is written in a temporary folder beside `output_dir`, fsynced, and swapped into place whole,
so readers see the old store or the new one. Under ``accelerate launch`` the encoding is shared by the
processes (`encode.py`, `distributed.py`) and the main process does the rest; each shard keeps its keys
(keys.npy, float16) for `silo datastore reindex`.

A rebuild over an existing store is bound by its owners' opt-outs: every removal recorded there (owner,
shards, documents, and copies of removed documents by content hash) is left out of the new build, the
removal records, receipts and journal are carried over, the generation continues upwards (a reader never
sees it go back) and the store keeps its lineage id. The build holds the store's removal lock from reading
the records to the swap, so a removal cannot slip in between.
"""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from silo.core.config import StageConfig
from silo.core.corpus import Document, load_documents
from silo.core.files import fsync_tree, swap_dir_atomic
from silo.core.fingerprint import model_fingerprint
from silo.core.models import load_lm

from .distributed import BuildRanks
from .encode import SCRATCH_KEYS, encode_shares
from .format import (
    GATE_FILE, MANIFEST, DatastoreError, IndexRef, Manifest, ModelRef, ShardRecord, now, store_lock,
)
from .journal import append_journal
from .removal_records import Exclusions, read_exclusions
from .indexing import TRAIN_SEED, fill_index, keys_digest, make_index, train_quantizer
from .keys import KeyExtractor
from .keys_store import KEYS_DTYPE, keys_from_f32, open_keys, sample_keys
from .shard import write_index, write_shard_info
from .store import Datastore


class IndexSpec(StageConfig):
    factory: str = "Flat"  # any FAISS index_factory string: Flat, SQfp16, IVF1024,PQ32, IVF256,SQ8 ...
    nprobe: int = Field(16, gt=0)  # IVF lists visited per query
    train_sample: int = Field(200_000, gt=0)  # keys sampled to train an IVF/PQ quantizer
    # Text whose keys train the quantizer, held by the model owner and never removable (e.g. the permissive
    # training text, pkg:demo/train): the quantizer then owes nothing to any store owner and a removal
    # keeps it. None: keys sampled across the store's shards, which every removal then retrains from the
    # keys that stay (a pass over the whole store). README "Opt-out: exactness".
    train_corpus: list[str] | None = None
    device: Literal["cpu", "cuda"] = "cpu"
    mmap: bool = True  # readers map the shards instead of reading them (recorded in the manifest)


class DatastoreConfig(StageConfig):
    model: str  # HF model folder or hub id; its fingerprint is written into the manifest
    device: str = "auto"  # the model's while encoding: auto | cpu | cuda | cuda:N (index.device: the index's)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 (or float16) on a GPU
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


def slug(text: str) -> str:
    import re

    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")
    return s or "unnamed"


def _group_documents(docs: list[Document], shard_by: str) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for d in docs:
        key = d.owner if shard_by == "owner" else (d.domain or "default")
        groups.setdefault(key, []).append(d)
    return groups


def _first_chars(docs: list[Document], budget: int) -> list[Document]:
    kept, used = [], 0
    for d in docs:
        if kept and used + len(d.text) > budget:
            break
        kept.append(d)
        used += len(d.text)
    return kept


def corpus_groups(cfg: DatastoreConfig, docs: list[Document] | None = None) -> dict[str, list[Document]]:
    """The documents a build of `cfg` takes from its corpus, by owner (or domain; the shard's name is its
    `slug`) and before any removal leaves out its documents: grouped, then each group's `max_chars_per_shard`
    slice."""
    docs = load_documents(cfg.corpus, cfg.domains) if docs is None else docs
    groups = _group_documents(docs, cfg.shard_by)
    if cfg.max_chars_per_shard:
        groups = {k: _first_chars(v, cfg.max_chars_per_shard) for k, v in groups.items()}
    return groups


def build_datastore(cfg: DatastoreConfig, progress: bool = True, config_source: str = "",
                    bound_by: Exclusions | None = None) -> Datastore | None:
    """Build a store from a corpus and a model; the finished store replaces `output_dir` atomically.
    Under accelerate, ranks other than the main one return None once their share is encoded. `bound_by`:
    removals of another store to honour as well (a reference build for the equivalence check)."""
    import torch

    ranks = BuildRanks.from_env()  # one process unless launched by accelerate (distributed.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if (out / MANIFEST).exists() and not cfg.overwrite:
        raise DatastoreError(f"{out} already holds a store; pass --overwrite (datastore.overwrite: true) to replace it")
    if out.exists() and not (out / MANIFEST).exists() and any(out.iterdir()):
        raise DatastoreError(f"{out} exists and is not a datastore; choose an empty or new output_dir")
    model, tokenizer = load_lm(cfg.model, ranks.device or cfg.device, cfg.dtype)
    fp = model_fingerprint(model, tokenizer)
    docs = load_documents(cfg.corpus, cfg.domains)
    if not docs:
        raise DatastoreError(f"datastore.corpus: no documents in {cfg.corpus} (domains {cfg.domains})")
    # Only the main process takes the store's lock (the others would wait on it while it waits for them at
    # the barrier); it reads the removal records under the lock and sends them to every rank, so all ranks
    # leave out the same documents and a removal cannot slip in before the swap.
    with store_lock(out) if ranks.is_main else nullcontext():
        return _build(cfg, out, model, tokenizer, fp, docs, progress, config_source, ranks, bound_by)


def _build(cfg: DatastoreConfig, out: Path, model, tokenizer, fp: str, docs: list[Document], progress: bool,
           config_source: str, ranks: BuildRanks, bound_by: Exclusions | None) -> Datastore | None:
    previous = Manifest.read(out) if ranks.is_main and (out / MANIFEST).exists() else None
    excl = read_exclusions(out) if previous is not None else Exclusions()
    excl = ranks.broadcast(excl.union(bound_by) if bound_by is not None else excl)
    progress = progress and ranks.is_main
    # The slice of each shard is taken before the removed documents leave it: a removal takes its documents
    # out of the slice without pulling others in, so the store after a removal and a rebuild without the
    # removed content hold the same documents.
    groups, excluded = _leave_out_removed(cfg, out, corpus_groups(cfg, docs), excl, progress)

    tmp = ranks.shared_tmp(out)
    if ranks.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "shards").mkdir(parents=True)
    ranks.barrier()
    extractor = KeyExtractor(model, tokenizer, cfg.window, cfg.stride, cfg.batch_size)
    key_dim = model.get_output_embeddings().in_features
    t0 = time.time()
    counts = encode_shares(ranks, extractor, groups, tmp, slug, progress)
    if counts is None:
        return None  # this rank's share is written; the main process indexes and publishes the store
    shard_recs = [ShardRecord(name=slug(key), owner=key if cfg.shard_by == "owner" else "", dir=f"shards/{slug(key)}",
                              entries=n, documents=nd) for key, (n, nd) in counts.items()]
    encode_s = time.time() - t0
    n_total = sum(r.entries for r in shard_recs)

    t1 = time.time()
    index_ref = _index_shards(cfg, tmp, shard_recs, key_dim, extractor, progress)
    index_s = time.time() - t1

    generation = previous.generation + 1 if previous is not None else 1
    lineage = previous.lineage if previous is not None and previous.lineage else uuid.uuid4().hex
    manifest = Manifest(
        generation=generation, created=now(), updated=now(), lineage=lineage,
        model=ModelRef(fingerprint=fp, path=cfg.model, key_dim=key_dim, vocab_size=len(tokenizer)),
        index=index_ref,
        build={"window": cfg.window, "stride": cfg.stride, "config_source": config_source,
               "config": cfg.model_dump(exclude={"overwrite"}), "processes": ranks.world,
               "encode_seconds": round(encode_s, 2), "index_seconds": round(index_s, 2)},
        shards=shard_recs)
    manifest.write(tmp)
    _carry_history(out, tmp)
    append_journal(tmp / "journal.jsonl", "build", generation=generation, entries=n_total,
                   excluded_documents=excluded, bound_by=excl.requests,
                   shards=[{"name": r.name, "entries": r.entries, "checksum": r.checksum} for r in shard_recs],
                   fingerprint=fp, index=cfg.index.factory)
    fsync_tree(tmp)
    swap_dir_atomic(tmp, out)
    if progress:
        print(f"datastore: {n_total:,} entries in {len(shard_recs)} shard(s) at {out} "
              f"(encode {encode_s:.1f}s, {n_total / max(encode_s, 1e-9):,.0f} keys/s; index {index_s:.1f}s)")
    return Datastore.open(out, fingerprint=fp, device=cfg.index.device)


def _leave_out_removed(cfg: DatastoreConfig, out: Path, groups: dict[str, list[Document]], excl: Exclusions,
                       progress: bool) -> tuple[dict[str, list[Document]], int]:
    """The groups without the documents earlier removals of this store bind the build to leave out (a group
    left empty goes), and how many documents that was."""
    if not excl:
        return groups, 0
    n = sum(len(v) for v in groups.values())
    kept = {g: [d for d in docs if not excl.excludes(d.id, d.owner, d.sha256, slug(g))] for g, docs in groups.items()}
    kept = {g: docs for g, docs in kept.items() if docs}
    left = n - sum(len(v) for v in kept.values())
    if progress:
        print(f"datastore: {left} document(s) left out: earlier opt-outs of this store bind its "
              f"rebuilds ({len(excl.requests)} removal request(s): {', '.join(excl.requests[:5])}"
              f"{' ...' if len(excl.requests) > 5 else ''})")
    if not kept:
        raise DatastoreError(f"{out}: every document of {cfg.corpus} was removed by an earlier opt-out")
    return kept, left


def _index_shards(cfg: DatastoreConfig, tmp: Path, shard_recs: list[ShardRecord], key_dim: int,
                  extractor: KeyExtractor, progress: bool) -> IndexRef:
    """Keep every shard's keys (keys.npy, float16), train the quantizer once when the index type needs one
    (indexing.py: on `train_corpus` keys, or on keys sampled across the shards), then fill one index per
    shard from its stored keys and write its shard.json (setting the records' checksums). Returns the
    manifest's index description."""
    for rec in shard_recs:
        keys_from_f32(tmp / rec.dir, tmp / rec.dir / SCRATCH_KEYS, key_dim)  # kept once, float16
    spec = cfg.index
    ref = IndexRef(factory=spec.factory, metric="l2", nprobe=spec.nprobe, mmap=spec.mmap)
    trained = None
    if not make_index(spec.factory, key_dim).is_trained:
        if spec.train_corpus:
            sample = _corpus_keys(spec, extractor, progress)
        else:
            sample = sample_keys([open_keys(tmp / r.dir, key_dim) for r in shard_recs], spec.train_sample, TRAIN_SEED)
        trained = train_quantizer(spec.factory, key_dim, sample, tmp / "quantizer.faiss", progress)
        ref.quantizer, ref.train_sample = "quantizer.faiss", spec.train_sample
        ref.trained_on, ref.train_corpus = ("corpus", list(spec.train_corpus)) if spec.train_corpus else ("store", None)
    for rec in tqdm(shard_recs, desc="datastore: indexing", unit="shard", disable=not progress or None):
        sdir = tmp / rec.dir
        write_index(sdir, fill_index(trained, spec.factory, key_dim, open_keys(sdir, key_dim)))
        rec.checksum = write_shard_info(sdir, {
            "name": rec.name, "owner": rec.owner, "entries": rec.entries, "documents": rec.documents,
            "created": now(), "key_dim": key_dim, "index_factory": spec.factory,
            "built_from": {"corpus": cfg.corpus, "domains": cfg.domains, "window": cfg.window, "stride": cfg.stride}})
    if ref.trained_on == "store":
        ref.trained_keys = keys_digest(tmp, shard_recs)
    return ref


def _corpus_keys(spec: IndexSpec, extractor: KeyExtractor, progress: bool) -> np.ndarray:
    """`spec.train_sample` keys of the `train_corpus` text (rounded to float16 as stored keys are): its
    documents in an order drawn with the training seed, encoded until enough keys are in hand, then that
    many drawn with the same seed. A function of the corpus, the model and the config alone."""
    docs = load_documents(spec.train_corpus)
    if not docs:
        raise DatastoreError(f"datastore.index.train_corpus: no documents in {spec.train_corpus}")
    order = np.random.default_rng(TRAIN_SEED).permutation(len(docs))
    parts, have = [], 0
    bar = tqdm(total=spec.train_sample, desc="datastore: quantizer keys", unit="key", unit_scale=True,
               disable=not progress or None)
    for start in range(0, len(order), 8):
        for dk in extractor.iter_documents([docs[int(i)].text for i in order[start:start + 8]]):
            parts.append(dk.keys.astype(KEYS_DTYPE))
            have += len(dk.keys)
            bar.update(len(dk.keys))
        if have >= spec.train_sample:
            break
    bar.close()
    keys = np.concatenate(parts) if parts else np.zeros((0, extractor.model.get_output_embeddings().in_features))
    return sample_keys([keys], spec.train_sample, TRAIN_SEED)


def _carry_history(out: Path, tmp: Path) -> None:
    """A rebuild keeps the store's history: journal, fitted gate, its owners' removal records and receipts."""
    for name in ("journal.jsonl", GATE_FILE):
        if (out / name).exists():
            shutil.copy2(out / name, tmp / name)
    for folder in ("removals", "receipts"):
        if (out / folder).is_dir():
            shutil.copytree(out / folder, tmp / folder)
