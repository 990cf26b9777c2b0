"""The contribution ledger: how much of the served text each data owner's content carried.

One SQLite file (`serve.ledger`) in WAL mode with synchronous=FULL: every response is one transaction
(a `responses` row and one `credits` row per credited owner), committed before the response is
returned, so a crash leaves the file at the last committed response and a restart carries on from it.
Totals are sums over the per-response rows, so they always equal the sum of what the responses credited.

A response credits owner O with tokens = sum over its sentences of O's share of the sentence times the
sentence's generated tokens (the attribution's shares: silo/model/attribution.py), and with share =
those tokens / the response's completion tokens. An owner that opts out (an owner removal through
DataOwner, or one found in the store's removal records at start) keeps its history; responses recorded
after its removal credit it nothing.

    ledger = Ledger("runs/ledger.sqlite")
    ledger.record("g000001", credits_of(attributions), completion_tokens=40, mode="knn", store_generation=3)
    ledger.totals()              # [OwnerTotals(owner, responses, tokens, share, first, last, removed...)]
"""

from __future__ import annotations

import csv
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, TextIO

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
  id INTEGER PRIMARY KEY, request_id TEXT NOT NULL, ts REAL NOT NULL, mode TEXT NOT NULL,
  store_generation INTEGER, completion_tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS credits (
  response INTEGER NOT NULL REFERENCES responses(id), owner TEXT NOT NULL, tokens REAL NOT NULL,
  share REAL NOT NULL, PRIMARY KEY (response, owner));
CREATE INDEX IF NOT EXISTS credits_owner ON credits(owner);
CREATE TABLE IF NOT EXISTS removed_owners (owner TEXT PRIMARY KEY, removed_at REAL NOT NULL, request_id TEXT NOT NULL);
"""


class LedgerError(RuntimeError):
    """The ledger file cannot be opened or written; the message names the file."""


def iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else ""


def credits_of(attributions: Iterable) -> dict[str, float]:
    """Attributed tokens per owner of one response: sum over sentences of share * the sentence's tokens."""
    out: dict[str, float] = {}
    for a in attributions:
        for s in a.sources:
            out[s.owner] = out.get(s.owner, 0.0) + s.share * a.tokens
    return {o: t for o, t in out.items() if t > 0}


@dataclass
class OwnerTotals:
    owner: str
    responses: int
    tokens: float
    share: float
    first_credit: str
    last_credit: str
    removed: bool = False
    removed_at: str = ""
    removal_request: str = ""


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise LedgerError(f"{self.path}: could not switch the ledger to WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            got = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if got is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif got[0] != SCHEMA_VERSION:
                raise LedgerError(f"{self.path}: ledger schema {got[0]}, this version reads {SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot open the ledger: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, fn):
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return out
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: ledger write failed: {exc}") from exc

    def record(self, request_id: str, credits: dict[str, float], completion_tokens: int, mode: str,
               store_generation: int | None = None) -> dict[str, float]:
        """Record one response (one transaction); returns the credits kept (removed owners get none)."""
        def write(db):
            removed = {r[0] for r in db.execute("SELECT owner FROM removed_owners")}
            kept = {o: t for o, t in credits.items() if o not in removed}
            cur = db.execute("INSERT INTO responses (request_id, ts, mode, store_generation, completion_tokens) "
                             "VALUES (?, ?, ?, ?, ?)", (request_id, time.time(), mode, store_generation,
                                                         int(completion_tokens)))
            db.executemany("INSERT INTO credits VALUES (?, ?, ?, ?)",
                           [(cur.lastrowid, o, float(t), float(t) / max(1, completion_tokens))
                            for o, t in sorted(kept.items())])
            return kept
        return self._write(write)

    def mark_removed(self, owner: str, request_id: str, at: float | None = None) -> bool:
        """The owner opted out: no credit from now on, history kept. False if it was marked already."""
        def write(db):
            cur = db.execute("INSERT OR IGNORE INTO removed_owners VALUES (?, ?, ?)",
                             (owner, at or time.time(), request_id))
            return cur.rowcount == 1
        return self._write(write)

    def totals(self, owner: str | None = None) -> list[OwnerTotals]:
        """Per owner (credited or removed): responses, tokens and shares summed over the recorded rows."""
        where, args = ("WHERE c.owner = ?", (owner,)) if owner else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT c.owner, COUNT(*), SUM(c.tokens), SUM(c.share), MIN(r.ts), MAX(r.ts) FROM credits c "
                f"JOIN responses r ON r.id = c.response {where} GROUP BY c.owner", args).fetchall()
            removed = {r[0]: r[1:] for r in self._db.execute("SELECT owner, removed_at, request_id FROM removed_owners")}
        out = {o: OwnerTotals(o, n, t, s, iso(a), iso(b)) for o, n, t, s, a, b in rows}
        for o, (at, req) in removed.items():
            if owner and o != owner:
                continue
            row = out.setdefault(o, OwnerTotals(o, 0, 0.0, 0.0, "", ""))
            row.removed, row.removed_at, row.removal_request = True, iso(at), req
        return sorted(out.values(), key=lambda r: r.owner)

    def responses(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def per_response(self, owner: str | None = None) -> list[dict]:
        """One row per (response, owner) credit, oldest first (the audit trail behind the totals)."""
        where, args = ("WHERE c.owner = ?", (owner,)) if owner else ("", ())
        with self._lock:
            rows = self._db.execute(
                "SELECT r.request_id, r.ts, r.mode, r.store_generation, r.completion_tokens, c.owner, c.tokens, "
                f"c.share FROM credits c JOIN responses r ON r.id = c.response {where} ORDER BY r.id, c.owner",
                args).fetchall()
        keys = ("request_id", "time", "mode", "store_generation", "completion_tokens", "owner", "tokens", "share")
        return [dict(zip(keys, (r[0], iso(r[1]), *r[2:]))) for r in rows]


def write_report(ledger: Ledger, out: TextIO, owner: str | None = None, per_response: bool = False) -> int:
    """The ledger as CSV: one line per owner (or per response and owner); returns the number of lines."""
    rows = ledger.per_response(owner) if per_response else [asdict(t) for t in ledger.totals(owner)]
    fields = (["request_id", "time", "mode", "store_generation", "completion_tokens", "owner", "tokens", "share"]
              if per_response else list(OwnerTotals.__dataclass_fields__))
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    return len(rows)
