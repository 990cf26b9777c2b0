"""The encoding half of a build: documents -> keys, entries and document records in shard folders.

`encode_shard` writes one run of a group's documents (keys.f32 scratch file, entries.npy, documents.jsonl;
document indices are the documents' places in the whole group). `encode_shares` does it for every group:
directly into ``shards/<name>/`` in a single process, or, under accelerate (`distributed.py`), each rank
its share into ``parts/<name>/rank-<r>/``, after which the main process concatenates the parts in rank
order into ``shards/<name>/``. Indexing, the manifest and the swap into place stay in `build.py`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from silo.core.corpus import Document
from silo.core.files import fsync_path
from silo.core.text import sentence_of_offsets, sentence_spans

from .distributed import BuildRanks, document_shares
from .format import ENTRY_DTYPE, DatastoreError, StoredDocument
from .keys import KeyExtractor
from .shard import read_documents, write_documents, write_entries

SCRATCH_KEYS = "keys.f32"  # raw float32 keys while building; indexed, then kept as keys.npy (float16)


def stored_document(doc: Document, index: int, tokens: int, spans) -> StoredDocument:
    """The store's record of corpus document `doc`: its place in the shard, entry count and sentence spans."""
    return StoredDocument(index=index, id=doc.id, owner=doc.owner, text=doc.text, license=doc.license, tier=doc.tier,
                          title=doc.title, source=doc.source, url=doc.url, domain=doc.domain, sha256=doc.sha256,
                          tokens=int(tokens), sentences=tuple((int(a), int(b)) for a, b in spans))


def encode_shard(extractor: KeyExtractor, group: Sequence[Document], sdir: Path, indices: range,
                 bar=None) -> tuple[int, int]:
    """Encode group[i] for i in `indices` into `sdir`; returns (entries, documents) written."""
    sdir.mkdir(parents=True, exist_ok=True)
    docs = [group[i] for i in indices]
    entry_parts, doc_recs = [], []
    with open(sdir / SCRATCH_KEYS, "wb") as kf:
        for dk in extractor.iter_documents([d.text for d in docs]):
            doc, gi = docs[dk.doc_index], indices[dk.doc_index]
            spans = sentence_spans(doc.text)
            sent = np.asarray(sentence_of_offsets(spans, dk.char_offsets.tolist()), dtype=np.int32)
            rows = np.empty(len(dk.keys), dtype=ENTRY_DTYPE)
            rows["token"], rows["doc"], rows["pos"], rows["sent"] = dk.next_tokens, gi, dk.positions, sent
            entry_parts.append(rows)
            kf.write(dk.keys.tobytes())
            doc_recs.append(stored_document(doc, gi, len(dk.keys), spans))
            if bar is not None:
                bar.update(len(doc.text))
    entries = np.concatenate(entry_parts) if entry_parts else np.zeros(0, ENTRY_DTYPE)
    write_entries(sdir, entries)
    write_documents(sdir, doc_recs)
    fsync_path(sdir / SCRATCH_KEYS)
    return int(len(entries)), len(doc_recs)


def _merge_parts(parts: list[Path], sdir: Path) -> tuple[int, int]:
    """Concatenate rank parts (in order) into one shard folder; the parts are deleted."""
    sdir.mkdir(parents=True)
    entries = np.concatenate([np.load(p / "entries.npy") for p in parts])
    docs = [d for p in parts for d in read_documents(p)]
    if [d.index for d in docs] != list(range(len(docs))):
        raise DatastoreError(f"{sdir}: the ranks' parts do not hold the documents in order (were all ranks given "
                             "the same corpus and config?)")
    with open(sdir / SCRATCH_KEYS, "wb") as out:
        for p in parts:
            with open(p / SCRATCH_KEYS, "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 24)
    fsync_path(sdir / SCRATCH_KEYS)
    write_entries(sdir, entries)
    write_documents(sdir, docs)
    for p in parts:
        shutil.rmtree(p)
    return int(len(entries)), len(docs)


def encode_shares(ranks: BuildRanks, extractor: KeyExtractor, groups: dict[str, list[Document]], tmp: Path,
                  name_of: Callable[[str], str], progress: bool = True) -> dict[str, tuple[int, int]] | None:
    """Encode every group into ``tmp/shards/<name_of(group)>/``; returns {group: (entries, documents)} on
    the main process and None on the others (their share is written; the main process finishes)."""
    shares = document_shares({g: [len(d.text) for d in docs] for g, docs in groups.items()}, ranks.world)
    mine = shares[ranks.rank]
    chars = sum(len(groups[g][i].text) for g, r in mine.items() for i in r)
    desc = "datastore: encoding" + (f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else "")
    bar = tqdm(total=chars, desc=desc, unit="char", unit_scale=True, disable=not progress or not ranks.is_main or None)

    def part_dir(g: str, r: int) -> Path:
        return tmp / "shards" / name_of(g) if ranks.world == 1 else tmp / "parts" / name_of(g) / f"rank-{r:05d}"

    error = None
    try:
        counts = {g: encode_shard(extractor, groups[g], part_dir(g, ranks.rank), r, bar) for g, r in mine.items()}
    except Exception as exc:  # reported to every rank below, so none waits for a share that never comes
        if ranks.world == 1:
            raise
        error, counts = f"{type(exc).__name__}: {exc}", {}
    bar.close()
    if ranks.world == 1:
        return counts
    ranks.check_all(error)
    if not ranks.is_main:
        return None
    out = {}
    for g in groups:
        parts = [part_dir(g, r) for r in range(ranks.world) if g in shares[r]]
        out[g] = _merge_parts(parts, tmp / "shards" / name_of(g))
    shutil.rmtree(tmp / "parts", ignore_errors=True)
    return out
