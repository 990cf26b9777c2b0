"""Bytes, not only indexes: does any file of a store still hold a removed document's text, keys or codes?

`BytePatterns` collects what to look for, per removed document:

* its text, cut into `CHUNK`-byte pieces at every multiple of `CHUNK` of its UTF-8 bytes, and the same
  for the text as JSON writes it (escaped, with and without ``ensure_ascii``): any run of the text of at
  least 2 x CHUNK - 1 bytes that survives in some file contains one whole piece;
* its token ids, as int32 and uint16 runs of CHUNK bytes (what a token index over the text would store);
* its keys, row by row: float16 (keys.npy) and float32 (a flat index, the build's scratch file);
* its codes: each key as the store's index would encode it (`faiss.Index.sa_encode`, without the inverted
  list number), under the quantizer it was stored with and under the current one.

`scan_files` then reads every file under a folder (journal, receipts, removal records and locks
included) and reports each place where one of them occurs. A piece that the store's live documents hold
as well (a stock phrase, a key two documents share because their contexts are the same) is not evidence
of a leftover and is dropped first (`drop_shared`), and counted; so is a piece of fewer than
`MIN_DISTINCT` distinct byte values (a run of spaces pads every .npy header).

The search is exact and fast: every file is read as 64-bit words at each of the 8 byte alignments, each
run of 4 words (32 bytes) is hashed, the hashes are looked up among the patterns' first 32 bytes, and a
hit is confirmed by comparing the whole pattern.
"""

from __future__ import annotations

import json
import mmap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHUNK = 32  # bytes per text or token piece (and the hashed anchor of every pattern)
BLOCK = 1 << 24  # bytes of a file searched at a time
_TABLE = 1 << 24  # entries of the table of anchor hashes' low bits
MIN_DISTINCT = 8  # a text or token piece with fewer distinct byte values is not looked for (padding, rules)
_MULT = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5], dtype=np.uint64)


def _anchor_words(words: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every run of 4 consecutive words of `words` (uint64): len(words) - 3 values."""
    n = len(words) - 3
    if n <= 0:
        return np.zeros(0, np.uint64)
    h = words[:n] * _MULT[0]
    for j in range(1, 4):
        h ^= words[j:j + n] * _MULT[j]
    return h


def _anchor(pattern: bytes) -> int:
    return int(_anchor_words(np.frombuffer(pattern[:CHUNK], dtype=np.uint64))[0])


@dataclass(frozen=True)
class Finding:
    """A removed document's bytes found in a file: where, what kind, whose."""

    file: str
    offset: int
    kind: str
    document: str

    def to_json(self) -> dict:
        return {"file": self.file, "offset": self.offset, "kind": self.kind, "document": self.document}


@dataclass(frozen=True)
class ScanReport:
    """What `scan_files` read, what it looked for, and what it found."""

    folder: str
    files: int
    bytes: int
    patterns: dict[str, int]  # per kind: pieces looked for
    shared: dict[str, int]  # per kind: pieces the live documents hold too (not looked for)
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.findings

    def to_json(self, limit: int = 50) -> dict:
        by_file: dict[str, int] = {}
        for f in self.findings:
            by_file[f.file] = by_file.get(f.file, 0) + 1
        return {"passed": self.passed, "files": self.files, "bytes": self.bytes, "patterns": self.patterns,
                "shared_with_live_documents": self.shared, "findings": len(self.findings),
                "findings_by_file": by_file, "first_findings": [f.to_json() for f in self.findings[:limit]],
                "seconds": round(self.seconds, 2)}


class BytePatterns:
    """The byte strings of removed documents to look for (see the module docstring)."""

    def __init__(self):
        self.patterns: list[bytes] = []
        self.kinds: list[str] = []
        self.documents: list[str] = []
        self.shared: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.patterns)

    def _add(self, kind: str, document: str, pattern: bytes) -> None:
        if len(pattern) >= CHUNK:
            self.patterns.append(pattern)
            self.kinds.append(kind)
            self.documents.append(document)

    def _pieces(self, kind: str, document: str, data: bytes) -> None:
        for i in range(0, len(data) - CHUNK + 1, CHUNK):
            piece = data[i:i + CHUNK]
            if len(set(piece)) < MIN_DISTINCT:  # a run of spaces, dashes or zeros says nothing about a document
                self.shared["low_information"] = self.shared.get("low_information", 0) + 1
                continue
            self._add(kind, document, piece)

    def text(self, document: str, text: str) -> None:
        """The document's text: UTF-8, and as JSON strings write it (escaped, with and without ensure_ascii)."""
        forms = {text.encode("utf-8"), json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8"),
                 json.dumps(text)[1:-1].encode("ascii")}
        for data in forms:
            self._pieces("text", document, data)

    def tokens(self, document: str, ids: Iterable[int]) -> None:
        """The document's token ids as int32 and (when they fit) uint16 runs."""
        arr = np.asarray(list(ids), dtype=np.int64)
        self._pieces("tokens", document, arr.astype("<i4").tobytes())
        if len(arr) and arr.min() >= 0 and arr.max() < 1 << 16:
            self._pieces("tokens", document, arr.astype("<u2").tobytes())

    def rows(self, kind: str, document: str, rows: np.ndarray) -> None:
        """Each row of `rows` (keys, codes) as one pattern of its raw bytes."""
        rows = np.ascontiguousarray(rows)
        for r in rows.reshape(len(rows), -1):
            self._add(kind, document, r.tobytes())

    def drop_shared(self, live: Iterable[bytes | np.ndarray], kinds: tuple[str, ...]) -> int:
        """Forget the patterns of `kinds` that occur in `live` (the live documents' text, tokens, key or code
        rows: bytes the store rightly holds); returns how many went."""
        found = set()
        for blob in live:
            mv = memoryview(np.ascontiguousarray(blob)).cast("B") if isinstance(blob, np.ndarray) else memoryview(blob)
            found |= {i for i, _ in _search_all(mv, self) if self.kinds[i] in kinds}
        for i in found:
            self.shared[self.kinds[i]] = self.shared.get(self.kinds[i], 0) + 1
        keep = [i for i in range(len(self.patterns)) if i not in found]
        self.patterns = [self.patterns[i] for i in keep]
        self.kinds = [self.kinds[i] for i in keep]
        self.documents = [self.documents[i] for i in keep]
        self._index = None
        return len(found)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.kinds:
            out[k] = out.get(k, 0) + 1
        return out

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted anchor hashes, pattern number of each, a table of the hashes' low bits), built once: the
        table rules out nearly every position of a file before the sorted lookup."""
        if getattr(self, "_index", None) is None:
            anchors = np.array([_anchor(p) for p in self.patterns], dtype=np.uint64)
            order = np.argsort(anchors, kind="stable")
            table = np.zeros(_TABLE, dtype=bool)
            table[(anchors & np.uint64(_TABLE - 1)).astype(np.int64)] = True
            self._index = (anchors[order], order, table)
        return self._index


def _search(buf: memoryview, patterns: BytePatterns, stop: int) -> list[tuple[int, int]]:
    """(pattern number, offset) of every pattern occurring in `buf` at an offset below `stop`."""
    anchors, order, table = patterns.index()
    out: list[tuple[int, int]] = []
    if not len(anchors):
        return out
    n = len(buf)
    for align in range(8):
        count = (n - align) // 8
        if count < 4:
            continue
        h = _anchor_words(np.frombuffer(buf, dtype=np.uint64, count=count, offset=align))
        cand = np.flatnonzero(table[(h & np.uint64(_TABLE - 1)).astype(np.int64)])
        pos = np.searchsorted(anchors, h[cand])
        pos[pos == len(anchors)] = 0
        for c in np.flatnonzero(anchors[pos] == h[cand]):
            w = int(cand[c])
            off = align + 8 * w
            j = int(pos[c])
            while off < stop and j < len(anchors) and anchors[j] == h[w]:
                pat = patterns.patterns[int(order[j])]
                if buf[off:off + len(pat)] == pat:
                    out.append((int(order[j]), off))
                j += 1
    return out


def _search_all(mv: memoryview, patterns: BytePatterns) -> list[tuple[int, int]]:
    """`_search` over a buffer of any size, `BLOCK` bytes at a time (blocks overlap by the longest pattern)."""
    longest = max((len(p) for p in patterns.patterns), default=CHUNK)
    out = []
    for at in range(0, len(mv), BLOCK):
        view = mv[at:min(len(mv), at + BLOCK + longest)]
        try:
            out += [(p, at + off) for p, off in _search(view, patterns, BLOCK)]
        finally:
            view.release()
    return out


def scan_files(folder: str | Path, patterns: BytePatterns) -> ScanReport:
    """Every regular file under `folder` (or the file `folder` names), searched for every pattern (see the
    module docstring)."""
    t0 = time.time()
    root = Path(folder)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    findings, files, total = [], 0, 0
    for path in paths:
        files += 1
        size = path.stat().st_size
        total += size
        if size < CHUNK or not len(patterns):
            continue
        rel = path.name if path == root else path.relative_to(root).as_posix()
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mv = memoryview(mm)
            try:
                found = _search_all(mv, patterns)
            finally:
                mv.release()
        findings += [Finding(rel, off, patterns.kinds[p], patterns.documents[p]) for p, off in found]
    return ScanReport(str(root), files, total, patterns.counts(), dict(patterns.shared), tuple(findings),
                      time.time() - t0)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes ([n] uint64): rows equal in every byte hash alike, so whether a
    removed key (or code) equals a live one is a set lookup (`drop_shared` for rows)."""
    raw = np.ascontiguousarray(rows).reshape(len(rows), -1).view(np.uint8)
    pad = (-raw.shape[1]) % 8
    if pad:
        raw = np.pad(raw, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(raw).view(np.uint64)
    mult = (np.arange(words.shape[1], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
    h = np.zeros(len(words), dtype=np.uint64)
    for j in range(words.shape[1]):
        h ^= words[:, j] * mult[j]
        h = (h << np.uint64(7)) | (h >> np.uint64(57))
    return h
