"""An exact-match index over a stream of token documents: a suffix array (EleutherAI's `tokengrams`,
a Rust suffix-table engine; no sorting of our own) with a document map.

    folder/
      tokens.bin    the stream: for each document its separator (the LM's BOS/EOS id) then its tokens, one
                    more separator at the end; little-endian uint16 (uint32 for vocabularies over 65,536)
      table.idx     tokengrams' suffix table over tokens.bin (8 bytes per token)
      starts.npy    int64 [documents + 1]: stream offset of each document's separator, then the stream length

Queries: how often a token sequence occurs (`count`), the longest suffix of a context that occurs
(`longest_suffix`, by binary search: every substring of an occurring sequence occurs too), which tokens
follow a sequence and how often (`next_counts`, the infini-gram estimate's numerator), and where it occurs
(`occurrences`: document index and the token offset in the document). A separator starts every document, so
a context that begins with BOS matches documents' beginnings, as the LM reads them; the separator between
two documents also ends every n-gram that would run across them.

Documents can be hidden (`hidden`: tombstones awaiting a rebuild): their occurrences are dropped from every
answer, by reading the occurrences themselves instead of the suffix table's counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .files import fsync_path

TOKENS, TABLE, STARTS = "tokens.bin", "table.idx", "starts.npy"
FILES = (TOKENS, TABLE, STARTS)
POSITIONS_MAX = 4096  # below this many occurrences, continuations are read from the stream itself


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _vocab_arg(vocab_size: int) -> int:
    return 1 << 16 if vocab_size <= 1 << 16 else 1 << 32


def write_stream(folder: Path, documents: Iterable[Sequence[int]], separator: int, vocab_size: int) -> np.ndarray:
    """tokens.bin and starts.npy of `documents` (token id sequences) into `folder`; returns the starts."""
    folder = Path(folder)
    dtype = token_dtype(vocab_size)
    starts = [0]
    with open(folder / TOKENS, "wb") as fh:
        for doc in documents:
            arr = np.asarray(doc, dtype=np.int64)
            if len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"{folder}: a token id outside [0, {vocab_size})")
            fh.write(np.concatenate([[separator], arr]).astype(dtype).tobytes())
            starts.append(starts[-1] + 1 + len(arr))
        fh.write(np.asarray([separator], dtype=dtype).tobytes())
        fh.flush()
    fsync_path(folder / TOKENS)
    out = np.asarray(starts[:-1] + [starts[-1] + 1], dtype=np.int64)
    np.save(folder / STARTS, out)
    fsync_path(folder / STARTS)
    return out


def build_index(folder: Path, documents: Iterable[Sequence[int]], separator: int, vocab_size: int) -> "TokenIndex":
    """Write the stream of `documents` and its suffix table into `folder` (which must exist)."""
    import tokengrams

    folder = Path(folder)
    write_stream(folder, documents, separator, vocab_size)
    tokengrams.MemmapIndex.build(str(folder / TOKENS), str(folder / TABLE), vocab=_vocab_arg(vocab_size),
                                 verbose=False)
    fsync_path(folder / TABLE)
    return TokenIndex.open(folder, vocab_size)


def has_index(folder: Path) -> bool:
    return all((Path(folder) / f).exists() for f in FILES)


@dataclass
class Occurrences:
    """Where a sequence occurs: document index and token offset in the document (0 = its separator) of each
    occurrence, and the stream offset right after it (where its continuation is)."""

    doc: np.ndarray
    offset: np.ndarray
    after: np.ndarray


class TokenIndex:
    """One opened index (see the module docstring); thread-safe for reading."""

    def __init__(self, folder: Path, index, tokens: np.ndarray, starts: np.ndarray, vocab_size: int):
        self.folder = Path(folder)
        self._index = index
        self.tokens = tokens  # memory-mapped stream
        self.starts = starts
        self.vocab_size = vocab_size
        self.hidden: np.ndarray = np.zeros(0, np.int64)  # document indices whose occurrences are dropped
        self._unigram: np.ndarray | None = None

    @classmethod
    def open(cls, folder: Path, vocab_size: int) -> "TokenIndex":
        import tokengrams

        folder = Path(folder)
        missing = [f for f in FILES if not (folder / f).exists()]
        if missing:
            raise FileNotFoundError(f"{folder}: not an exact-match index (missing {', '.join(missing)})")
        tokens = np.memmap(folder / TOKENS, dtype=token_dtype(vocab_size), mode="r")
        starts = np.load(folder / STARTS)
        if len(starts) < 1 or int(starts[-1]) != len(tokens):
            raise ValueError(f"{folder / STARTS}: does not describe {folder / TOKENS} ({len(tokens)} tokens)")
        index = tokengrams.MemmapIndex(str(folder / TOKENS), str(folder / TABLE), vocab=_vocab_arg(vocab_size))
        return cls(folder, index, tokens, starts, vocab_size)

    def hiding(self, docs: Iterable[int]) -> "TokenIndex":
        """A view of this index without the occurrences in documents `docs` (same files)."""
        view = TokenIndex(self.folder, self._index, self.tokens, self.starts, self.vocab_size)
        view.hidden = np.asarray(sorted(set(int(d) for d in docs)), dtype=np.int64)
        return view

    @property
    def documents(self) -> int:
        return len(self.starts) - 1

    @property
    def size(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in FILES)

    def document_tokens(self, doc: int) -> np.ndarray:
        """Document `doc`'s tokens (without its separator)."""
        return np.asarray(self.tokens[int(self.starts[doc]) + 1:int(self.starts[doc + 1])], dtype=np.int64)

    # ------------------------------------------------------------------------------ queries
    def count(self, query: Sequence[int]) -> int:
        q = [int(t) for t in query]
        if not q:
            return self.size - len(self.hidden)
        if len(self.hidden):
            return len(self.occurrences(q, limit=None).doc)
        return int(self._index.count(q))

    def contains(self, query: Sequence[int]) -> bool:
        q = [int(t) for t in query]
        if not q:
            return True
        if len(self.hidden):
            return self.count(q) > 0
        return bool(self._index.contains(q))

    def longest_suffix(self, context: Sequence[int], max_n: int | None = None, at_least: int = 0) -> int:
        """Length of the longest suffix of `context` (at most `max_n` tokens) that occurs; `at_least`: a length
        known to occur (a growing text's previous answer less one), where the search starts."""
        n = len(context) if max_n is None else min(len(context), max_n)
        lo, hi = min(at_least, n), n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.contains(context[len(context) - mid:]):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def occurrences(self, query: Sequence[int], limit: int | None = POSITIONS_MAX) -> Occurrences:
        """Occurrences of `query` (a non-empty sequence), in stream order; at most `limit` (None: all)
        before hidden documents are dropped."""
        q = [int(t) for t in query]
        pos = np.sort(np.asarray(self._index.positions(q), dtype=np.int64))
        if limit is not None:
            pos = pos[:limit]
        doc = np.searchsorted(self.starts, pos, side="right") - 1
        if len(self.hidden):
            keep = ~np.isin(doc, self.hidden)
            pos, doc = pos[keep], doc[keep]
        return Occurrences(doc=doc, offset=pos - self.starts[doc], after=pos + len(q))

    def unigram(self) -> np.ndarray:
        """Counts of every token in the stream (separators included), [vocab_size]."""
        if self._unigram is None:
            counts = np.bincount(np.asarray(self.tokens, dtype=np.int64), minlength=self.vocab_size)
            for d in self.hidden:  # tombstoned documents: their tokens do not count
                counts -= np.bincount(np.asarray(self.tokens[int(self.starts[d]):int(self.starts[d + 1])], np.int64),
                                      minlength=self.vocab_size)
            self._unigram = counts
        return self._unigram

    def next_counts(self, query: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, counts) of what follows `query` in the stream, most frequent first; the empty query gets
        the unigram counts."""
        q = [int(t) for t in query]
        if not q:
            c = self.unigram()
            tok = np.flatnonzero(c)
        elif len(self.hidden) or self._index.count(q) <= POSITIONS_MAX:
            occ = self.occurrences(q, limit=None)
            nxt = np.asarray(self.tokens[occ.after[occ.after < self.size]], dtype=np.int64)
            tok, cnt = np.unique(nxt, return_counts=True)
            order = np.argsort(-cnt, kind="stable")
            return tok[order], cnt[order].astype(np.int64)
        else:
            c = np.asarray(self._index.count_next(q), dtype=np.int64)
            tok = np.flatnonzero(c)
        cnt = c[tok]
        order = np.argsort(-cnt, kind="stable")
        return tok[order], cnt[order]
