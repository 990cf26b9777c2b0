"""The training-data index: an exact-match (suffix-array) index of the tokenized training stream, with the
training documents it maps back to, so that every output can be traced to the text the weights learnt from
(OLMoTrace's idea at SILO's scale) and the verbatim guard can cap it.

    <model>/training-index/
      index.json        format, the model's fingerprint, the sha256 of its provenance.json, the tokenizer's
                        BOS/EOS id, vocabulary size, documents, tokens, bytes, created
      documents.jsonl   per training document, in stream order: index, id, owner, license, tier, title,
                        source, url, domain, sha256, tokens, text
      tokens.bin, table.idx, starts.npy   the stream and its suffix table (silo.core.suffix)

`silo train` writes it beside the weights (the model folder is published with it); `silo index` writes it
for a model trained before it existed, from the training config's corpus through the same policy and
de-duplication, refusing when the documents differ from the provenance record. A reader refuses an index
made for other weights (fingerprint) or another provenance record.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from silo.core.corpus import Document
from silo.core.files import fsync_tree, sha256_file, swap_dir_atomic, write_json_atomic
from silo.core.suffix import TokenIndex, build_index

INDEX_DIR = "training-index"
INDEX_FORMAT = "silo.training_index.v1"


class TrainingIndexError(ValueError):
    """A training-data index is missing, malformed, or made for other weights; the message names the path."""


@dataclass(frozen=True)
class TrainingDocument:
    """One training document as the index holds it (the fields the output policy and tracing read)."""

    index: int
    id: str
    owner: str
    license: str = ""
    tier: str = ""
    title: str = ""
    source: str = ""
    url: str = ""
    domain: str = ""
    sha256: str = ""
    tokens: int = 0
    text: str = ""

    @classmethod
    def of(cls, i: int, d: Document, tokens: int) -> "TrainingDocument":
        return cls(i, d.id, d.owner, d.license, d.tier, d.title, d.source, d.url, d.domain, d.sha256, tokens, d.text)


def write_training_index(model_dir: Path, documents: Sequence[Document], token_lists: Sequence[Sequence[int]],
                         fingerprint: str, separator: int, vocab_size: int, into: Path | None = None) -> dict:
    """Write the index of `documents` (their tokens `token_lists`, in stream order) for the model in
    `model_dir` (whose provenance.json it binds) into `into` (default: model_dir/training-index, replaced
    whole); returns index.json's content."""
    t0 = time.time()
    model_dir = Path(model_dir)
    final = Path(into) if into is not None else model_dir / INDEX_DIR
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    index = build_index(tmp, token_lists, separator, vocab_size)
    with open(tmp / "documents.jsonl", "w", encoding="utf-8") as fh:
        for i, (d, ids) in enumerate(zip(documents, token_lists)):
            fh.write(json.dumps(asdict(TrainingDocument.of(i, d, len(ids))), ensure_ascii=False) + "\n")
    prov = model_dir / "provenance.json"
    info = {"format": INDEX_FORMAT, "fingerprint": fingerprint,
            "provenance_sha256": sha256_file(prov) if prov.exists() else "",
            "separator": int(separator), "vocab_size": int(vocab_size), "documents": len(documents),
            "tokens": int(index.size), "bytes": index.nbytes(), "seconds": round(time.time() - t0, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_json_atomic(tmp / "index.json", info)
    fsync_tree(tmp)
    swap_dir_atomic(tmp, final)
    return info


def bind_provenance(index_dir: Path, model_dir: Path) -> None:
    """Record the sha256 of `model_dir`'s provenance.json in the index (training writes the provenance
    after the index)."""
    path = Path(index_dir) / "index.json"
    info = json.loads(path.read_text(encoding="utf-8"))
    info["provenance_sha256"] = sha256_file(Path(model_dir) / "provenance.json")
    write_json_atomic(path, info)


def has_training_index(model_dir: Path) -> bool:
    return (Path(model_dir) / INDEX_DIR / "index.json").exists()


class TrainingIndex:
    """An opened training-data index: the suffix array, and the documents it maps back to."""

    def __init__(self, folder: Path, info: dict, tokens: TokenIndex, documents: list[TrainingDocument]):
        self.folder = folder
        self.info = info
        self.tokens = tokens
        self.documents = documents

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    @classmethod
    def open(cls, model_dir: str | Path, fingerprint: str | None = None) -> "TrainingIndex":
        """The index of the model in `model_dir`; refuses one made for other weights (`fingerprint`: the
        loaded model's) or another provenance record."""
        model_dir = Path(model_dir)
        folder = model_dir / INDEX_DIR
        path = folder / "index.json"
        if not path.exists():
            raise TrainingIndexError(f"{folder}: no training-data index; write one with `silo index --config C` "
                                     "(or retrain: `silo train` writes it)")
        info = json.loads(path.read_text(encoding="utf-8"))
        if info.get("format") != INDEX_FORMAT:
            raise TrainingIndexError(f"{path}: format {info.get('format')!r}, expected {INDEX_FORMAT!r}")
        if fingerprint is not None and info.get("fingerprint") != fingerprint:
            raise TrainingIndexError(f"{path}: made for model {str(info.get('fingerprint'))[:23]}..., the model is "
                                     f"{fingerprint[:23]}...; rebuild it with `silo index`")
        prov = model_dir / "provenance.json"
        if prov.exists() and info.get("provenance_sha256") and sha256_file(prov) != info["provenance_sha256"]:
            raise TrainingIndexError(f"{path}: made for another provenance record than {prov}; rebuild it with "
                                     "`silo index`")
        try:
            tokens = TokenIndex.open(folder, int(info["vocab_size"]))
        except (FileNotFoundError, ValueError) as exc:
            raise TrainingIndexError(str(exc)) from None
        with open(folder / "documents.jsonl", encoding="utf-8") as fh:
            docs = [TrainingDocument(**json.loads(line)) for line in fh if line.strip()]
        if len(docs) != tokens.documents:
            raise TrainingIndexError(f"{folder}: {len(docs)} documents for {tokens.documents} in the stream")
        return cls(folder, info, tokens, docs)

    def document(self, i: int) -> TrainingDocument:
        return self.documents[int(i)]


def split_stream(stream: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """The per-document token lists of a packed stream (`counts` tokens each, one separator after each)."""
    out, at = [], 0
    for n in counts:
        out.append(stream[at:at + n])
        at += n + 1
    return out
