"""Append-only, hash-chained journal of everything done to a store.

Each line is a JSON record carrying ``prev`` (the previous record's hash) and ``hash`` (sha256 of the
record's canonical JSON without ``hash``). Editing, dropping or reordering any earlier line breaks the
chain, which ``verify_journal`` reports with the line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

GENESIS = "0" * 64


class JournalError(ValueError):
    pass


def _digest(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class JournalRecord:
    """One journal line: its place in the chain (`seq`, `prev`, `hash`), when, the event, and the event's
    own details (request id, generation, counts ...: free-form, as the writer recorded them)."""

    seq: int
    time: str
    event: str
    prev: str
    hash: str
    details: dict = field(default_factory=dict, hash=False)

    @property
    def request_id(self) -> str | None:
        return self.details.get("request_id")

    @classmethod
    def from_json(cls, data: dict) -> "JournalRecord":
        """A parsed line; fields a damaged line lacks read as -1 / "" (verify_journal reports the damage)."""
        details = {k: v for k, v in data.items() if k not in ("seq", "time", "event", "prev", "hash")}
        return cls(seq=data.get("seq", -1), time=data.get("time", ""), event=data.get("event", ""),
                   prev=data.get("prev", ""), hash=data.get("hash", ""), details=details)

    def to_json(self) -> dict:
        return {"seq": self.seq, "time": self.time, "event": self.event, **self.details, "prev": self.prev,
                "hash": self.hash}


def read_journal(path: Path) -> list[JournalRecord]:
    return [JournalRecord.from_json(r) for r in _read_lines(path)]


def _read_lines(path: Path) -> list[dict]:
    """The journal's lines as written (the hash chain is checked over exactly these)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):
                break  # a torn last line (crash mid-append, no newline yet): the chain ends before it
            raise JournalError(f"{path}:{lineno}: not valid JSON") from None
    return records


def append_journal(path: Path, event: str, **details) -> JournalRecord:
    """Append one record (fsync'd) and return it."""
    records = _read_lines(path)
    prev = records[-1]["hash"] if records else GENESIS
    record = {"seq": len(records), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "event": event, **details, "prev": prev}
    record["hash"] = _digest(record)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        if fh.tell() > 0 and not _ends_with_newline(path):
            fh.write("\n")  # a torn line from an earlier crash must not swallow this record
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return JournalRecord.from_json(record)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def verify_journal(path: Path) -> tuple[bool, str, int]:
    """(ok, message, number of records). Checks each record's hash, sequence and link to the previous."""
    try:
        records = _read_lines(path)
    except JournalError as exc:
        return False, str(exc), 0
    prev = GENESIS
    for i, rec in enumerate(records):
        if rec.get("seq") != i:
            return False, f"record {i}: sequence number {rec.get('seq')} (expected {i})", len(records)
        if rec.get("prev") != prev:
            return False, f"record {i}: does not link to the previous record's hash", len(records)
        if rec.get("hash") != _digest(rec):
            return False, f"record {i}: content does not match its hash (edited?)", len(records)
        prev = rec["hash"]
    return True, f"{len(records)} record(s), chain intact", len(records)


def verify_store_journal(store_path: str | Path) -> tuple[bool, str, int]:
    """Check the store's journal hash chain; the message names the first bad record and its event."""
    jpath = Path(store_path) / "journal.jsonl"
    if not jpath.exists():
        return False, f"{jpath}: no journal", 0
    ok, msg, n = verify_journal(jpath)
    if not ok:
        m = re.match(r"record (\d+):", msg)
        if m:
            try:
                rec = read_journal(jpath)[int(m.group(1))]
                msg += f" [event {rec.event!r}" + (f", request {rec.request_id!r}]" if rec.request_id else "]")
            except Exception:
                pass
    return ok, f"{jpath}: {msg}", n
