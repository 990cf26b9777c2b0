"""The inf-gram index of a datastore (Liu et al. 2024): one exact-match index (silo.core.suffix, a
tokengrams suffix table) per shard, so that owner removal stays a shard operation.

    shards/<dir>/infgram/
      infgram.json    format, the shard checksum and model fingerprint it was built from, documents, tokens,
                      bytes, created
      tokens.bin, table.idx, starts.npy   each document's tokens behind a separator (the LM's BOS), in
                      document order (a document's index in documents.jsonl is its place in the stream)
      rows.npy        int32 per stream token: its entry's row in entries.npy (-1 at separators), so that an
                      inf-gram prediction names the entries (and through them the documents and sentences)
                      that carried it, as kNN-LM's neighbours do

The stream is read from the shard's own entries (each entry's next-token id, by document and position):
no tokenizer is needed and it is exactly the text the kNN keys were computed on. Tombstoned documents are
hidden at query time; a compaction rebuilds the index of the shard it rewrites (`compact_infgram`), and
an owner removal drops the shard's folder, index included. `StoreNgrams` is the inf-gram view of one
`Datastore` snapshot: the longest suffix of a context found in any shard, and the counts of what follows
it summed over the shards that hold it.

Layer rule: this module imports only silo.core and silo.datastore.
"""

from __future__ import annotations

import json
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from silo.core.files import fsync_tree, swap_dir_atomic, write_json_atomic
from silo.core.suffix import TokenIndex, build_index, has_index

from .format import DatastoreError, Manifest, now, store_lock
from .journal import append_journal
from .store import Datastore

INFGRAM_DIR = "infgram"
INFGRAM_FORMAT = "silo.infgram.v1"
MAX_N = 64  # longest context suffix looked up (a longer match continues a stored passage verbatim anyway)
_OPEN: "weakref.WeakValueDictionary[tuple[str, str], ShardNgrams]" = weakref.WeakValueDictionary()


def has_infgram(shard_dir: Path) -> bool:
    return (Path(shard_dir) / INFGRAM_DIR / "infgram.json").exists() and has_index(Path(shard_dir) / INFGRAM_DIR)


def shard_streams(entries: np.ndarray, documents: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each document's tokens and their entry rows, in position order (a gap in a document's positions
    would join tokens that were never adjacent: refused)."""
    order = np.lexsort((entries["pos"], entries["doc"]))
    doc = entries["doc"][order]
    bounds = np.searchsorted(doc, np.arange(documents + 1))
    toks, rows = [], []
    for d in range(documents):
        sel = order[bounds[d]:bounds[d + 1]]
        pos = entries["pos"][sel]
        if len(pos) and not np.array_equal(pos, np.arange(len(pos))):
            raise DatastoreError(f"document {d}: its entries' positions are not 0..{len(pos) - 1}")
        toks.append(entries["token"][sel].astype(np.int64))
        rows.append(sel.astype(np.int32))
    return toks, rows


def build_shard_infgram(shard_dir: Path, checksum: str | None, fingerprint: str, separator: int,
                        vocab_size: int) -> dict:
    """Write shards/<dir>/infgram from the shard's entries (replaced whole); returns infgram.json."""
    t0 = time.time()
    shard_dir = Path(shard_dir)
    entries = np.load(shard_dir / "entries.npy", mmap_mode="r")
    with open(shard_dir / "documents.jsonl", encoding="utf-8") as fh:
        documents = sum(1 for line in fh if line.strip())
    toks, rows = shard_streams(np.asarray(entries), documents)
    tmp = shard_dir / f".{INFGRAM_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        index = build_index(tmp, toks, separator, vocab_size)
        row_of = np.full(index.size, -1, np.int32)
        for d, r in enumerate(rows):
            a = int(index.starts[d]) + 1
            row_of[a:a + len(r)] = r
        np.save(tmp / "rows.npy", row_of)
        info = {"format": INFGRAM_FORMAT, "shard_checksum": checksum, "model_fingerprint": fingerprint,
                "separator": int(separator), "vocab_size": int(vocab_size), "documents": documents,
                "tokens": int(index.size), "bytes": index.nbytes() + (tmp / "rows.npy").stat().st_size,
                "seconds": round(time.time() - t0, 2), "created": now()}
        write_json_atomic(tmp / "infgram.json", info)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_dir_atomic(tmp, shard_dir / INFGRAM_DIR)
    return info


def build_infgram(store_path: str | Path, separator: int, progress: bool = True) -> dict:
    """An inf-gram index in every shard of the store (`separator`: the LM's BOS/EOS id); returns
    {shard name: infgram.json}. Serialised with removals and compactions (the store lock)."""
    store_path = Path(store_path)
    with store_lock(store_path):
        manifest = Manifest.read(store_path)
        out = {}
        for rec in manifest.shards:
            out[rec.name] = build_shard_infgram(store_path / rec.dir, rec.checksum, manifest.model.fingerprint,
                                                separator, int(manifest.model.vocab_size))
            if progress:
                i = out[rec.name]
                print(f"infgram: {rec.name}: {i['tokens']:,} tokens, {i['bytes'] / max(i['tokens'], 1):.1f} bytes/token")
        if (store_path / "journal.jsonl").exists():
            append_journal(store_path / "journal.jsonl", "build-infgram", generation=manifest.generation,
                           shards={k: v["tokens"] for k, v in out.items()})
    return out


def compact_infgram(old_shard: Path, new_shard: Path, shard_checksum: str) -> None:
    """The compacted shard's inf-gram index, rebuilt from its (already compacted) entries: the removed
    documents' tokens are in no file of the new folder."""
    info = json.loads((Path(old_shard) / INFGRAM_DIR / "infgram.json").read_text(encoding="utf-8"))
    build_shard_infgram(new_shard, shard_checksum, info.get("model_fingerprint", ""), int(info["separator"]),
                        int(info["vocab_size"]))


class ShardNgrams:
    """One shard's opened inf-gram index (shared by the snapshots that hold the same shard version)."""

    def __init__(self, folder: Path, info: dict):
        self.info = info
        self.index = TokenIndex.open(folder, int(info["vocab_size"]))
        self.rows = np.load(folder / "rows.npy", mmap_mode="r")

    @classmethod
    def open(cls, shard_dir: Path, checksum: str | None) -> "ShardNgrams":
        folder = Path(shard_dir) / INFGRAM_DIR
        key = (str(folder), str(checksum))
        got = _OPEN.get(key)
        if got is None:
            info = json.loads((folder / "infgram.json").read_text(encoding="utf-8"))
            if info.get("format") != INFGRAM_FORMAT:
                raise DatastoreError(f"{folder}: format {info.get('format')!r}, expected {INFGRAM_FORMAT!r}")
            if checksum is not None and info.get("shard_checksum") != checksum:
                raise DatastoreError(f"{folder}: built from another version of the shard; rebuild with "
                                     f"`silo datastore build-infgram`")
            got = cls(folder, info)
            _OPEN[key] = got
        return got


@dataclass
class Continuations:
    """What follows a context's longest stored suffix: its length `n` (0: none, the unigram counts), the
    tokens seen after it and their counts (summed over shards), most frequent first."""

    n: int
    tokens: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> int:
        return int(self.counts.sum())


class StoreNgrams:
    """The inf-gram view of one `Datastore` snapshot: every live shard's index, tombstones hidden."""

    def __init__(self, store: Datastore):
        self.store = store
        self.shards: list[TokenIndex] = []
        self.rows: list[np.ndarray] = []
        self._hold: list[ShardNgrams] = []
        for shard in store.shards:
            if not has_infgram(shard.dir):
                raise DatastoreError(f"{shard.dir / INFGRAM_DIR}: no inf-gram index for shard {shard.name}; build "
                                     f"them with `silo datastore build-infgram --store {store.path}`")
            rec = store.manifest.shard(shard.name)
            sn = ShardNgrams.open(shard.dir, rec.checksum if rec is not None else None)
            idx = sn.index.hiding(shard.removed_docs) if shard.removed_docs else sn.index
            self.shards.append(idx)
            self.rows.append(sn.rows)
            self._hold.append(sn)  # keeps the shared index alive while this view is

    def nbytes(self) -> int:
        return sum(i.nbytes() + r.nbytes for i, r in zip(self.shards, self.rows))

    @property
    def tokens(self) -> int:
        return sum(i.size for i in self.shards)

    def longest(self, context: Sequence[int], upto: int | None = None) -> tuple[int, list[int]]:
        """The longest suffix of `context` (at most MAX_N, and `upto`) found in any shard: its length and the
        shards that hold it."""
        cap = min(MAX_N, len(context), MAX_N if upto is None else upto)
        ctx = list(context[len(context) - cap:])
        lens = [i.longest_suffix(ctx) for i in self.shards]
        n = max(lens, default=0)
        return n, [s for s, m in enumerate(lens) if m == n]

    def continuations(self, context: Sequence[int], upto: int | None = None) -> Continuations:
        n, holders = self.longest(context, upto)
        q = list(context[len(context) - n:]) if n else []
        tok_parts, cnt_parts = [], []
        for s in holders if n else range(len(self.shards)):
            t, c = self.shards[s].next_counts(q)
            tok_parts.append(t)
            cnt_parts.append(c)
        if not tok_parts:
            return Continuations(0, np.zeros(0, np.int64), np.zeros(0, np.int64))
        tok = np.concatenate(tok_parts)
        cnt = np.concatenate(cnt_parts)
        uniq, inv = np.unique(tok, return_inverse=True)
        total = np.zeros(len(uniq), np.int64)
        np.add.at(total, inv, cnt)
        order = np.argsort(-total, kind="stable")
        return Continuations(n, uniq[order], total[order])

    def voters(self, context: Sequence[int], n: int, token: int, limit: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(shard, entry row) of the stored occurrences of the context's last `n` tokens followed by `token`
        (at most `limit`): the entries whose next token the inf-gram counted."""
        if n == 0:
            return np.zeros(0, np.int16), np.zeros(0, np.int64)
        q = list(context[len(context) - n:]) + [int(token)]
        shards, rows = [], []
        for s, idx in enumerate(self.shards):
            if not idx.contains(q):
                continue
            occ = idx.occurrences(q, limit=limit)
            r = np.asarray(self.rows[s][occ.after - 1], dtype=np.int64)
            shards.append(np.full(len(r), s, np.int16))
            rows.append(r)
        if not rows:
            return np.zeros(0, np.int16), np.zeros(0, np.int64)
        return np.concatenate(shards)[:limit], np.concatenate(rows)[:limit]

    def document_hits(self, query: Sequence[int]) -> list[tuple[int, int]]:
        """(shard, document) of every stored occurrence of `query` (tombstones hidden)."""
        out = []
        for s, idx in enumerate(self.shards):
            if query and idx.contains(query):
                out.extend((s, int(d)) for d in idx.occurrences(query, limit=None).doc)
        return out
