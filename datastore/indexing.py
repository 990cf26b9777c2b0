"""What a store derives from its keys: each shard's FAISS index and the quantizer every shard shares.

One set of functions, so that the build (`build.py`), a reindex (`reindex.py`) and a removal's retraining
(`removal.py`) make them the same way: a shard's index is filled from its stored keys (keys.npy, float16,
in row order), and a trained quantizer is trained on keys drawn with a fixed seed, either

* across the store's shards (``trained_on: store``): the centroids and codebooks then average every
  owner's keys, so a removal retrains them from the keys that stay (`reindex_shards`), which costs a
  pass over the whole store; or
* from text no store owner can withdraw (``trained_on: corpus``, `IndexSpec.train_corpus`: the model
  owner's permissive training text): a removal leaves the quantizer as it is.

Either way the store after a removal holds what a build without the removed content would have made
(`equivalence.py` checks it). `keys_digest` names the keys a store-trained quantizer was trained on, so a
removal knows whether its quantizer is stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from silo.core.files import crash_point, fsync_path, fsync_tree, write_json_atomic

from .blocks import has_blocks
from .format import DatastoreError, Manifest, ShardRecord, now
from .keys_store import KEYS_FILE, iter_chunks, open_keys, sample_keys
from .shard import write_index, write_shard_info

TRAIN_SEED = 0  # the seed of every quantizer's training sample: a rebuild draws the same keys
REGENERATED = ("index.faiss", "shard.json")  # what a reindex writes anew in a shard folder; the rest is linked


def make_index(factory: str, dim: int) -> faiss.Index:
    """An empty index of `factory` for `dim`-d keys; DatastoreError naming the factory when FAISS refuses it."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise DatastoreError(f"factory: {factory!r} is not a FAISS index_factory string for {dim}-d keys "
                             f"({str(exc).strip().splitlines()[-1]})") from None


def train_quantizer(factory: str, dim: int, sample: np.ndarray, path: Path, progress: bool = False) -> faiss.Index:
    """Train an empty `factory` index on `sample` and write it to `path` (the quantizer the shards share)."""
    probe = make_index(factory, dim)
    if len(sample) < 2:
        raise DatastoreError(f"{path.parent}: too few keys ({len(sample)}) to train a {factory} quantizer")
    if progress:
        print(f"datastore: training {factory} on {len(sample):,} keys", file=sys.stderr)
    probe.train(np.ascontiguousarray(sample, dtype=np.float32))
    faiss.write_index(probe, str(path))
    fsync_path(path)
    return probe


def fill_index(trained: faiss.Index | None, factory: str, dim: int, keys: np.ndarray) -> faiss.Index:
    """A shard's index: the trained quantizer (or a new untrained-type index) with `keys` added in row order.
    `keys` are the stored float16 keys, so every path to an index sees the same values."""
    index = faiss.clone_index(trained) if trained is not None else make_index(factory, dim)
    for _, chunk in iter_chunks(keys):
        index.add(chunk)
    return index


def shard_keys(store: Path, manifest: Manifest) -> list[np.ndarray]:
    """Every shard's stored keys (mapped), checked against the manifest's entry counts."""
    dim = int(manifest.model.key_dim)
    keys = [open_keys(store / rec.dir, dim) for rec in manifest.shards]
    for rec, k in zip(manifest.shards, keys):
        if len(k) != rec.entries:
            raise DatastoreError(f"{store / rec.dir / KEYS_FILE}: {len(k)} keys, the manifest records "
                                 f"{rec.entries} entries")
    return keys


def keys_digest(store: Path, shards: list[ShardRecord]) -> str:
    """sha256 over the shards' names and their keys.npy checksums (shard.json), in manifest order: the keys a
    store-trained quantizer was trained on. A removal that changed them leaves the quantizer stale."""
    rows = []
    for rec in shards:
        info_path = Path(store) / rec.dir / "shard.json"
        try:
            sums = json.loads(info_path.read_text(encoding="utf-8")).get("checksums", {})
        except (OSError, json.JSONDecodeError) as exc:
            raise DatastoreError(f"{info_path}: cannot read the shard's checksums ({exc})") from None
        rows.append([rec.name, sums.get(KEYS_FILE)])
    return "sha256:" + hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def quantizer_is_stale(store: Path, manifest: Manifest) -> bool:
    """True when the store's quantizer was trained on keys sampled across the store and the shards' keys
    changed since (an owner or documents left): it still averages keys that are gone."""
    ix = manifest.index
    if not ix.quantizer or ix.trained_on == "corpus":
        return False
    if not manifest.shards:
        return True  # nothing left to train on: the quantizer only holds what was removed
    return ix.trained_keys != keys_digest(store, manifest.shards)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def _carry_blocks(old_dir: Path, new_dir: Path, checksum: str) -> None:
    """The shard's RIC blocks into the new folder, re-tied to the new shard checksum (blocks.json is
    replaced, not edited: the linked original stays as it was)."""
    src, dst = old_dir / "blocks", new_dir / "blocks"
    shutil.copytree(src, dst, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))
    info = json.loads((src / "blocks.json").read_text(encoding="utf-8"))
    info.update(shard_checksum=checksum, reindexed=now())
    write_json_atomic(dst / "blocks.json", info)


def _link_shard_files(old_dir: Path, new_dir: Path) -> None:
    """Every file of the old shard folder but those a reindex writes anew (entries, documents, keys, the
    lookup index and whatever else a shard carries), hard-linked: shard files are never changed in place.
    Sub-folders other than blocks/ (re-tied by `_carry_blocks`) are linked file by file."""
    for p in sorted(old_dir.iterdir()):
        if p.is_file() and p.name not in REGENERATED:
            _link_or_copy(p, new_dir / p.name)
        elif p.is_dir() and p.name != "blocks":
            shutil.copytree(p, new_dir / p.name, copy_function=lambda s, d: _link_or_copy(Path(s), Path(d)))


def reindex_shard(store: Path, rec: ShardRecord, keys: np.ndarray, rel: str, factory: str, dim: int,
                  trained: faiss.Index | None) -> ShardRecord:
    """Shard `rec` in the new folder `rel`: its files linked from the old folder, the new index built from
    its stored keys, a new shard.json (and blocks re-tied to it). Returns its new manifest record."""
    old_dir, new_dir = store / rec.dir, store / rel
    if new_dir.exists():
        shutil.rmtree(new_dir)
    new_dir.mkdir(parents=True)
    _link_shard_files(old_dir, new_dir)
    index = fill_index(trained, factory, dim, keys)
    write_index(new_dir, index)
    del index
    crash_point("mid_reindex_write")
    info_path = old_dir / "shard.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info.pop("checksums", None)
    info.update(index_factory=factory, reindexed=now(), reindexed_from=rec.dir)
    checksum = write_shard_info(new_dir, info)
    if has_blocks(old_dir):
        _carry_blocks(old_dir, new_dir, checksum)
    fsync_tree(new_dir)
    return ShardRecord(name=rec.name, owner=rec.owner, dir=rel, entries=rec.entries, documents=rec.documents,
                       checksum=checksum, removed_docs=list(rec.removed_docs), extra=dict(rec.extra))


def reindex_shards(store: Path, manifest: Manifest, factory: str, train_sample: int, gen: int,
                   trained: faiss.Index | None = None,
                   progress: bool = False) -> tuple[list[ShardRecord], str | None, float]:
    """New folders ``shards/<name>@g<gen>`` for every shard with a `factory` index from its stored keys.
    An index type that needs training gets `trained` (a quantizer to keep) or, when None, one trained here
    on `train_sample` keys drawn across the shards with `TRAIN_SEED` and written as quantizer@g<gen>.faiss.
    Returns the new records, the quantizer's file name (None when nothing was trained here) and the seconds
    training took; the caller writes the manifest."""
    dim = int(manifest.model.key_dim)
    keys = shard_keys(store, manifest)
    name, t0 = None, time.time()
    if trained is None and not make_index(factory, dim).is_trained:
        name = f"quantizer@g{gen}.faiss"
        trained = train_quantizer(factory, dim, sample_keys(keys, train_sample, TRAIN_SEED), store / name, progress)
    train_s = time.time() - t0
    recs = [reindex_shard(store, rec, k, f"shards/{rec.name}@g{gen}", factory, dim, trained)
            for rec, k in tqdm(list(zip(manifest.shards, keys)), desc="reindex: shards", unit="shard",
                               disable=not progress or None)]
    if (store / "shards").exists():
        fsync_path(store / "shards")
    return recs, name, train_s


def remove_unreferenced(store: Path, manifest: Manifest) -> list[str]:
    """Delete folders under shards/ and quantizer files that `manifest` does not reference (dropped,
    superseded or half-written ones). Lists one folder; reads no shard. Returns what went."""
    # Compare names, not resolved paths: one listing, no per-shard syscalls (cost stays flat).
    live = {Path(r.dir).as_posix().strip("/") for r in manifest.shards}
    gone = []
    sdir = store / "shards"
    for p in sorted(sdir.iterdir()) if sdir.exists() else []:
        if f"shards/{p.name}" not in live and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
            gone.append(p.name)
    for p in sorted(store.glob("quantizer*.faiss")):
        if p.name != manifest.index.quantizer:
            p.unlink()
            gone.append(p.name)
    if gone and sdir.exists():
        fsync_path(sdir)
    return gone
