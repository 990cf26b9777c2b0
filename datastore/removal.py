"""Opt-out: recorded, exact, crash-safe removal of a data owner's content from a store.

A removal request names an owner, document ids or shards, plus who asked and why. Its life::

    received  -> the request is validated against the store, saved (removals/<id>.json) and journaled
    applied   -> a new manifest generation no longer serves the content: whole shards are dropped from
                 manifest.json (their folders deleted), documents are tombstoned in the shard's
                 ``removed_docs`` (Datastore.open filters them with a FAISS IDSelector at once)
    compacted -> tombstoned documents are rewritten out of their shard into a NEW folder
                 ``shards/<name>@g<generation>`` (index, entries, documents, shard.json), the manifest
                 points to it and the old folder is deleted, so the removed text is in no file any more;
                 a receipt is written (receipts/<id>.json)
    verified  -> `silo.optout` checked with the LM that nothing of it is retrieved or reproduced and
                 added the results to the receipt

Crash safety: files are never changed in place. manifest.json, request states and receipts are replaced
whole (`write_json_atomic`); a compacted shard is written to a folder no manifest references until the
manifest switch; old folders are deleted only after the switch. A process killed at any point leaves a
store that opens as the old or the new generation, and `resume` / `resume_all` finish the request: every
step checks the manifest first and does only what is still missing, and folders under ``shards/`` that
the manifest does not reference are garbage. Mutations hold an exclusive lock (``.removal.lock``) so a
CLI and a server cannot interleave manifest writes.

Readers: an open `Datastore` holds its indexes in memory, entries mmapped and documents parsed, so it
keeps working after its folders are deleted (Linux keeps unlinked open files). A reader opening the
store exactly while a folder is deleted can see "missing" for a shard; `open_store_retrying` retries.

``SILO_CRASH_AT=<point>`` makes the process exit (status 77) at that point, for crash tests; the points
are listed in `CRASH_POINTS`.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np

from .journal import append_journal, read_journal
from .sentences import split_sentences
from .store import (
    Datastore, DatastoreError, ENTRY_DTYPE, ShardMissing, _ivf_of, fsync_path, read_manifest, sha256_file,
    write_json_atomic,
)

CRASH_ENV = "SILO_CRASH_AT"
CRASH_POINTS = (
    "after_journal_received",  # request saved + journaled, manifest untouched
    "after_manifest_write",  # the removal generation is live, state still says "received"
    "mid_compaction_write",  # half of the new shard folder written, manifest still on the old folder
    "after_compaction_manifest_write",  # manifest points to the compacted folder, state still "applied"
    "before_old_shard_delete",  # manifest no longer references the old folder(s), they still exist
    "before_receipt",  # everything done except the receipt
)
KINDS = ("owner", "documents", "shards")
STATUSES = ("received", "applied", "compacted", "verified")
SHARD_FILES = ("index.faiss", "entries.npy", "documents.jsonl")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")  # request ids become file names


class RemovalError(DatastoreError):
    """A removal request is invalid or cannot be carried out; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def crash_point(name: str) -> None:
    """Exit the process at once (no cleanup, like a kill) if SILO_CRASH_AT names this point."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(77)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _listing(items, limit: int = 20) -> str:
    items = sorted(set(items))
    shown = ", ".join(items[:limit])
    return shown + (f" ... ({len(items)} in all)" if len(items) > limit else "") if items else "(none)"


# --------------------------------------------------------------------------------------------- request

@dataclass
class RemovalRequest:
    """What to remove and who asked. Give exactly one of owner / document_ids / shards (kind is inferred
    when omitted). `request_id` is generated when absent; it is used as a file name, so it is restricted
    to letters, digits, '.', '_' and '-'."""

    kind: str = ""
    owner: str | None = None
    document_ids: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    requester: str = ""
    reason: str = ""
    request_id: str = ""
    created: str = ""

    def __post_init__(self) -> None:
        self.document_ids = list(self.document_ids or [])
        self.shards = list(self.shards or [])
        if not self.kind:
            given = [k for k, v in (("owner", self.owner), ("documents", self.document_ids),
                                    ("shards", self.shards)) if v]
            if len(given) != 1:
                raise RemovalError("give exactly one of owner, document_ids or shards "
                                   f"(got {', '.join(given) or 'none'})", "kind")
            self.kind = given[0]
        if not self.request_id:
            self.request_id = f"rm-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        if not self.created:
            self.created = _now()
        self.validate()

    def validate(self) -> None:
        """Check the request on its own (the store check is `RemovalManager.resolve`)."""
        if self.kind not in KINDS:
            raise RemovalError(f"kind must be one of {', '.join(KINDS)} (got {self.kind!r})", "kind")
        if not isinstance(self.request_id, str) or not _ID_RE.match(self.request_id):
            raise RemovalError("request_id must be 1-80 letters, digits, '.', '_' or '-' and start with a "
                               f"letter or digit (got {self.request_id!r})", "request_id")
        want = {"owner": "owner", "documents": "document_ids", "shards": "shards"}[self.kind]
        for name in ("owner", "document_ids", "shards"):
            value = getattr(self, name)
            if name == want:
                if name == "owner":
                    if not isinstance(value, str) or not value.strip():
                        raise RemovalError("owner: a removal of kind 'owner' needs a non-empty owner", "owner")
                elif not value or not all(isinstance(x, str) and x.strip() for x in value):
                    raise RemovalError(f"{name}: a removal of kind '{self.kind}' needs a non-empty list of "
                                       f"non-empty strings (got {value!r})", name)
            elif value:
                raise RemovalError(f"{name}: not allowed in a removal of kind '{self.kind}' "
                                   f"(give only {want})", name)
        for name in ("requester", "reason"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise RemovalError(f"{name}: required (who asked for the removal, and why)", name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RemovalRequest":
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise RemovalError(f"unknown field(s) {', '.join(sorted(unknown))} in removal request",
                               sorted(unknown)[0])
        return cls(**data)

    @classmethod
    def coerce(cls, obj: "RemovalRequest | dict") -> "RemovalRequest":
        return obj if isinstance(obj, cls) else cls.from_dict(dict(obj))


# --------------------------------------------------------------------------------------------- helpers

def open_store_retrying(path: str | Path, attempts: int = 5, **kwargs) -> Datastore:
    """`Datastore.open` that retries when a removal deletes a folder between reading the manifest and
    loading the shard (the manifest read on the next try names only live folders)."""
    for i in range(attempts):
        try:
            return Datastore.open(path, **kwargs)
        except ShardMissing:
            if i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")


def read_documents(shard_dir: Path) -> list[dict]:
    with open(shard_dir / "documents.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _norm(text: str) -> str:
    return " ".join(text.split())


def compact_index(index: faiss.Index, keep: np.ndarray) -> faiss.Index:
    """A new index holding only the rows where `keep` is True, renumbered so FAISS id == new row.

    Flat-like indexes: ``remove_ids`` shifts the remaining vectors down, which is exactly that
    renumbering (order kept). IVF indexes store ids explicitly and ``remove_ids`` would leave gaps, so we
    rebuild the inverted lists: copy each list's codes as they are (no re-encoding, so search results for
    the kept entries are bit-identical) with ids remapped old -> new. Indexes that support neither are
    rebuilt from reconstructed vectors.
    """
    keep = np.asarray(keep, dtype=bool)
    if len(keep) != index.ntotal:
        raise DatastoreError(f"compact_index: keep mask has {len(keep)} rows, index {index.ntotal}")
    new_id = np.full(len(keep), -1, dtype=np.int64)
    new_id[keep] = np.arange(int(keep.sum()), dtype=np.int64)
    ivf = _ivf_of(index)
    if ivf is not None:
        out = faiss.clone_index(index)
        out.reset()
        ivf_out = faiss.extract_index_ivf(out)
        inv = ivf.invlists
        cs = inv.code_size
        total = 0
        for lst in range(ivf.nlist):
            n = inv.list_size(lst)
            if n == 0:
                continue
            ids_ptr, codes_ptr = inv.get_ids(lst), inv.get_codes(lst)
            ids = faiss.rev_swig_ptr(ids_ptr, n).copy()
            codes = faiss.rev_swig_ptr(codes_ptr, n * cs).copy().reshape(n, cs)
            inv.release_ids(lst, ids_ptr)
            inv.release_codes(lst, codes_ptr)
            mapped = new_id[ids]
            sel = mapped >= 0
            m = int(sel.sum())
            if m:
                nid = np.ascontiguousarray(mapped[sel])
                ncodes = np.ascontiguousarray(codes[sel])
                ivf_out.invlists.add_entries(lst, m, faiss.swig_ptr(nid), faiss.swig_ptr(ncodes))
                total += m
        ivf_out.ntotal = total
        out.ntotal = total  # a wrapper (e.g. IndexPreTransform) keeps its own count
        return out
    dead = np.flatnonzero(~keep).astype(np.int64)
    out = faiss.clone_index(index)
    if len(dead) == 0:
        return out
    try:
        removed = out.remove_ids(faiss.IDSelectorBatch(len(dead), faiss.swig_ptr(dead)))
        if removed == len(dead) and out.ntotal == int(keep.sum()):
            return out
    except RuntimeError:
        pass
    vecs = index.reconstruct_n(0, index.ntotal)[keep]
    out = faiss.clone_index(index)
    out.reset()
    if len(vecs):
        out.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return out


def _compact_blocks(old: Path, new: Path, remap: np.ndarray, shard_checksum: str) -> None:
    """Carry a shard's RIC blocks (datastore/blocks.py) into its compacted folder without the removed
    documents: blocks.jsonl filtered and renumbered, dense vectors filtered (no re-embedding), BM25
    re-indexed from the kept blocks (its vocabulary and statistics must not keep the removed text), and
    blocks.json tied to the new shard checksum so `BlockStore` accepts it without a rebuild."""
    from .blocks import _BM25_ARGS

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
                compacted=_now())
    write_json_atomic(new / "blocks.json", info)


# --------------------------------------------------------------------------------------------- manager

class RemovalManager:
    """Removal requests against one store folder. All methods return plain JSON-able dicts.

    Typical use (what `silo datastore remove --no-verify` does)::

        m = RemovalManager("runs/demo/store")
        m.submit(RemovalRequest(owner="gcide", requester="legal@x", reason="opt-out"))   # live at once
        receipt = m.compact(request_id)                                                  # bytes gone

    `silo.optout.remove_and_verify` adds the LM checks on top.
    """

    def __init__(self, store_path: str | Path):
        self.path = Path(store_path)
        read_manifest(self.path)  # fail early, naming the path, if this is not a store
        self.removals_dir = self.path / "removals"
        self.receipts_dir = self.path / "receipts"

    # ------------------------------------------------------------------------------ state files
    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.path / ".removal.lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _state_path(self, request_id: str) -> Path:
        if not isinstance(request_id, str) or not _ID_RE.match(request_id):
            raise RemovalError(f"request_id: not a valid request id ({request_id!r})", "request_id")
        return self.removals_dir / f"{request_id}.json"

    def _load(self, request_id: str) -> dict:
        p = self._state_path(request_id)
        if not p.exists():
            known = [x.stem for x in self.removals_dir.glob("*.json")] if self.removals_dir.exists() else []
            raise RemovalError(f"request_id: no removal request {request_id!r} in {self.path} "
                               f"(known: {_listing(known)})", "request_id")
        return json.loads(p.read_text(encoding="utf-8"))

    def _save(self, state: dict) -> None:
        self.removals_dir.mkdir(exist_ok=True)
        state["updated"] = _now()
        write_json_atomic(self._state_path(state["request"]["request_id"]), state)

    def _set_status(self, state: dict, status: str, **extra) -> None:
        state["status"] = status
        state.setdefault("timestamps", {})[status] = _now()
        state.update(extra)
        self._save(state)

    def _journal_once(self, event: str, request_id: str, **details) -> dict:
        """Append a journal record unless this request already has one for `event` (resume after a
        crash between the journal append and the state save must not log a step twice)."""
        jpath = self.path / "journal.jsonl"
        for rec in reversed(read_journal(jpath)):
            if rec.get("event") == event and rec.get("request_id") == request_id:
                return rec
        return append_journal(jpath, event, request_id=request_id, **details)

    # ------------------------------------------------------------------------------ resolve
    def resolve(self, request: RemovalRequest | dict, manifest: dict | None = None) -> dict:
        """What the request removes in the current generation, or RemovalError naming the field and
        listing what exists. Owner and shard requests read only manifest.json (so their cost does not
        depend on the rest of the store); document requests read documents.jsonl of the shards."""
        req = RemovalRequest.coerce(request)
        manifest = manifest or read_manifest(self.path)
        recs = manifest["shards"]
        drop, docs = [], []  # whole shards; per-shard document tombstones

        def shard_target(rec):
            return {"name": rec["name"], "owner": rec.get("owner", ""), "dir": rec["dir"],
                    "entries": int(rec.get("entries", 0)), "documents": int(rec.get("documents", 0)),
                    "checksum": rec.get("checksum")}

        if req.kind == "shards":
            names = {r["name"]: r for r in recs}
            unknown = [s for s in req.shards if s not in names]
            if unknown:
                raise RemovalError(f"shards: unknown shard(s) {_listing(unknown)}; the store has "
                                   f"{_listing(names)}", "shards")
            drop = [shard_target(names[s]) for s in dict.fromkeys(req.shards)]
        elif req.kind == "owner":
            drop = [shard_target(r) for r in recs if r.get("owner") == req.owner]
            # Domain-sharded stores (shard owner "") mix owners: tombstone that owner's documents there.
            mixed = [r for r in recs if not r.get("owner")]
            owners = {r["owner"] for r in recs if r.get("owner")}
            for rec in mixed:
                hits, removed = [], set(rec.get("removed_docs", []))
                for d in read_documents(self.path / rec["dir"]):
                    owners.add(d["owner"])
                    if d["owner"] == req.owner and d["index"] not in removed:
                        hits.append(d)
                if hits:
                    docs.append({**shard_target(rec), "document_ids": [d["id"] for d in hits],
                                 "removed_entries": sum(int(d["tokens"]) for d in hits)})
            if not drop and not docs:
                raise RemovalError(f"owner: no content of owner {req.owner!r} in the store; owners present: "
                                   f"{_listing(owners)}", "owner")
        else:
            wanted = set(req.document_ids)
            found: dict[str, list[dict]] = {}
            all_ids = []
            for rec in recs:
                removed = set(rec.get("removed_docs", []))
                hits = []
                for d in read_documents(self.path / rec["dir"]):
                    if d["index"] in removed:
                        continue  # already removed: not "in the store"
                    all_ids.append(d["id"])
                    if d["id"] in wanted:
                        hits.append(d)
                        found.setdefault(d["id"], []).append(d)
                if hits:
                    docs.append({**shard_target(rec), "document_ids": [d["id"] for d in hits],
                                 "removed_entries": sum(int(d["tokens"]) for d in hits)})
            unknown = [x for x in req.document_ids if x not in found]
            if unknown:
                raise RemovalError(f"document_ids: not in the store: {_listing(unknown)}; documents present: "
                                   f"{_listing(all_ids)}", "document_ids")
        entries = sum(t["entries"] for t in drop) + sum(t["removed_entries"] for t in docs)
        return {"drop_shards": drop, "drop_documents": docs, "entries": entries,
                "generation": int(manifest["generation"])}

    # ------------------------------------------------------------------------------ submit / apply
    def submit(self, request: RemovalRequest | dict) -> dict:
        """Record the request (journal ``removal_received``) and apply it; returns the state (status
        ``applied``). Nothing is changed when validation fails."""
        req = RemovalRequest.coerce(request)
        with self._lock():
            if self._state_path(req.request_id).exists():
                raise RemovalError(f"request_id: {req.request_id!r} already exists in {self.path}", "request_id")
            targets = self.resolve(req)
            state = {"request": req.to_dict(), "status": "received", "timestamps": {"received": _now()},
                     "targets": targets, "generation_before": targets["generation"], "store": str(self.path)}
            self._save(state)
            self._journal_received(state)
            crash_point("after_journal_received")
            return self._apply(state)

    def _journal_received(self, state: dict) -> None:
        r = state["request"]
        self._journal_once("removal_received", r["request_id"],
                           **{k: r[k] for k in ("kind", "owner", "document_ids", "shards", "requester", "reason")},
                           entries=state["targets"]["entries"], generation=state["targets"]["generation"])

    def _apply(self, state: dict) -> dict:
        """Make the content unreachable in a new generation (idempotent: checks the manifest first)."""
        rid = state["request"]["request_id"]
        t = state["targets"]
        manifest = read_manifest(self.path)
        drop_names = {x["name"] for x in t["drop_shards"]}
        recs = [r for r in manifest["shards"] if r["name"] not in drop_names]
        changed = len(recs) != len(manifest["shards"])
        for target in t["drop_documents"]:
            rec = next((r for r in recs if r["name"] == target["name"]), None)
            if rec is None:
                continue  # the whole shard went meanwhile
            ids = set(target["document_ids"])
            removed = set(rec.get("removed_docs", []))
            # Indices are re-read by id: a compaction by another request may have renumbered them.
            new = {d["index"] for d in read_documents(self.path / rec["dir"]) if d["id"] in ids} - removed
            if new:
                rec["removed_docs"] = sorted(removed | new)
                changed = True
        if changed:
            manifest["shards"] = recs
            manifest["generation"] = int(manifest["generation"]) + 1
            manifest["updated"] = _now()
            write_json_atomic(self.path / "manifest.json", manifest)
            crash_point("after_manifest_write")
        gen = int(read_manifest(self.path)["generation"])
        self._journal_once("removal_applied", rid, generation=gen,
                           dropped_shards=sorted(drop_names),
                           tombstoned={x["name"]: x["document_ids"] for x in t["drop_documents"]})
        if state["status"] == "received":
            self._set_status(state, "applied", generation_applied=gen)
        if t["drop_shards"]:
            crash_point("before_old_shard_delete")
            self._gc(manifest=read_manifest(self.path))
        return state

    # ------------------------------------------------------------------------------ compact
    def compact(self, request_id: str) -> dict:
        """Rewrite the request's tombstoned documents out of their shards (new folders, manifest switch,
        old folders deleted) and write the receipt; returns the receipt. Whole-shard removals have
        nothing to rewrite (their folders went at apply). Idempotent."""
        with self._lock():
            state = self._load(request_id)
            if state["status"] == "received":
                raise RemovalError(f"request {request_id!r} is not applied yet; run resume", "request_id")
            return self._compact(state)

    def _compact(self, state: dict) -> dict:
        rid = state["request"]["request_id"]
        if state["status"] == "applied":
            for target in state["targets"]["drop_documents"]:
                self._compact_shard(target["name"])
            crash_point("before_old_shard_delete")
            self._gc()
            manifest = read_manifest(self.path)
            self._journal_once("removal_compacted", rid, generation=int(manifest["generation"]),
                               shards=self._after(state, manifest))
            self._set_status(state, "compacted", generation_compacted=int(manifest["generation"]))
        crash_point("before_receipt")
        return self._ensure_receipt(state)

    def _ensure_receipt(self, state: dict) -> dict:
        """The receipt for the state's status; an existing one is kept (its hash is in the journal)."""
        rid = state["request"]["request_id"]
        path = self.receipts_dir / f"{rid}.json"
        if path.exists():
            receipt = json.loads(path.read_text(encoding="utf-8"))
            if receipt.get("status") == state["status"]:
                self._journal_once(f"removal_receipt_{state['status']}", rid, receipt_sha256=sha256_file(path))
                return receipt
        return self._write_receipt(state)

    def _compact_shard(self, name: str) -> None:
        """Rewrite shard `name` without its tombstoned documents into shards/<name>@g<gen>."""
        manifest = read_manifest(self.path)
        rec = next((r for r in manifest["shards"] if r["name"] == name), None)
        if rec is None or not rec.get("removed_docs"):
            return  # gone, or already compacted (resume after the manifest switch)
        gen = int(manifest["generation"]) + 1
        old_dir = self.path / rec["dir"]
        new_rel = f"shards/{name}@g{gen}"
        new_dir = self.path / new_rel
        if new_dir.exists():
            shutil.rmtree(new_dir)  # a half-written attempt from a crash; never referenced
        new_dir.mkdir(parents=True)
        removed = set(rec["removed_docs"])
        docs = read_documents(old_dir)
        remap = np.full(len(docs), -1, dtype=np.int64)
        kept_docs = []
        for d in docs:
            if d["index"] not in removed:
                remap[d["index"]] = len(kept_docs)
                kept_docs.append({**d, "index": len(kept_docs)})
        entries = np.load(old_dir / "entries.npy")
        keep = remap[entries["doc"]] >= 0
        new_entries = np.ascontiguousarray(entries[keep])
        new_entries["doc"] = remap[new_entries["doc"]].astype(np.int32)
        index = compact_index(faiss.read_index(str(old_dir / "index.faiss")), keep)
        if index.ntotal != len(new_entries):
            raise DatastoreError(f"{old_dir}: compaction left {index.ntotal} keys for {len(new_entries)} entries")
        faiss.write_index(index, str(new_dir / "index.faiss"))
        fsync_path(new_dir / "index.faiss")
        np.save(new_dir / "entries.npy", new_entries.astype(ENTRY_DTYPE))
        fsync_path(new_dir / "entries.npy")
        crash_point("mid_compaction_write")
        with open(new_dir / "documents.jsonl", "w", encoding="utf-8") as fh:
            for d in kept_docs:
                fh.write(json.dumps(d, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        info_path = old_dir / "shard.json"
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
        info.update(entries=int(len(new_entries)), documents=len(kept_docs), compacted=_now(),
                    compacted_from=rec["dir"], removed_documents=len(docs) - len(kept_docs),
                    checksums={f: sha256_file(new_dir / f) for f in SHARD_FILES})
        write_json_atomic(new_dir / "shard.json", info)
        checksum = sha256_file(new_dir / "shard.json")
        if (old_dir / "blocks" / "blocks.json").exists():
            _compact_blocks(old_dir / "blocks", new_dir / "blocks", remap, checksum)
        fsync_path(new_dir)
        fsync_path(new_dir.parent)
        rec.update(dir=new_rel, entries=int(len(new_entries)), documents=len(kept_docs), checksum=checksum)
        rec.pop("removed_docs", None)
        manifest["generation"] = gen
        manifest["updated"] = _now()
        write_json_atomic(self.path / "manifest.json", manifest)
        crash_point("after_compaction_manifest_write")

    # ------------------------------------------------------------------------------ gc / resume
    def _gc(self, manifest: dict | None = None) -> list[str]:
        """Delete folders under shards/ that the manifest does not reference (dropped or superseded
        shards, half-written compactions) and stray temp files. Lists one folder; reads no shard."""
        manifest = manifest or read_manifest(self.path)
        # Compare names, not resolved paths: one listing, no per-shard syscalls (cost stays flat).
        live = {Path(r["dir"]).as_posix().strip("/") for r in manifest["shards"]}
        gone = []
        sdir = self.path / "shards"
        for p in sorted(sdir.iterdir()) if sdir.exists() else []:
            if f"shards/{p.name}" not in live and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
                gone.append(p.name)
        for folder in (self.path, self.removals_dir, self.receipts_dir):
            for tmp in folder.glob(".*.tmp-*") if folder.exists() else []:
                tmp.unlink(missing_ok=True)
        if gone and sdir.exists():
            fsync_path(sdir)
        return gone

    def resume(self, request_id: str) -> dict:
        """Finish an interrupted request (apply, compact, receipt: whatever is missing); returns the
        receipt. Safe to call on a finished request."""
        with self._lock():
            state = self._load(request_id)
            if state["status"] == "received":
                self._journal_received(state)
                state = self._apply(state)
            receipt = self._compact(state)
            self._gc()
            return receipt

    def resume_all(self) -> list[dict]:
        """Resume every unfinished request (and collect garbage); returns their receipts."""
        out = []
        for st in self.list():
            rid = st["request_id"]
            if st["status"] in ("received", "applied") or not (self.receipts_dir / f"{rid}.json").exists():
                out.append(self.resume(rid))
        with self._lock():
            self._gc()
        return out

    # ------------------------------------------------------------------------------ queries
    def status(self, request_id: str) -> dict:
        """The saved state of a request: request, status, timestamps, targets, generations."""
        return self._load(request_id)

    def list(self) -> list[dict]:
        """One summary per request, oldest first."""
        if not self.removals_dir.exists():
            return []
        out = []
        for p in self.removals_dir.glob("*.json"):
            st = json.loads(p.read_text(encoding="utf-8"))
            r = st["request"]
            out.append({"request_id": r["request_id"], "kind": r["kind"], "owner": r["owner"],
                        "document_ids": r["document_ids"], "shards": r["shards"], "requester": r["requester"],
                        "created": r["created"], "status": st["status"], "entries": st["targets"]["entries"]})
        return sorted(out, key=lambda x: (x["created"], x["request_id"]))

    def receipt(self, request_id: str) -> dict:
        p = self.receipts_dir / f"{self._state_path(request_id).stem}.json"
        if not p.exists():
            st = self._load(request_id)  # names unknown ids
            raise RemovalError(f"request_id: {request_id!r} has no receipt yet (status {st['status']}); "
                               "run resume", "request_id")
        return json.loads(p.read_text(encoding="utf-8"))

    def record_verification(self, request_id: str, verification: dict) -> dict:
        """Attach LM verification results to the receipt (status ``verified``); journal
        ``removal_verified``. Returns the receipt."""
        with self._lock():
            state = self._load(request_id)
            if state["status"] not in ("compacted", "verified"):
                raise RemovalError(f"request {request_id!r} is {state['status']}; compact it first", "request_id")
            self._journal_once("removal_verified", request_id, passed=bool(verification.get("passed")),
                               generation=int(read_manifest(self.path)["generation"]))
            self._set_status(state, "verified", verification=verification)
            return self._write_receipt(state)

    def lookup(self, document_id: str | None = None, text: str | None = None, min_sentence_chars: int = 20) -> dict:
        """Is it in the store? By document id, or by text: documents whose whitespace-normalised text
        contains the passage, or that share a sentence of it (sentences of at least `min_sentence_chars`
        characters, so "Ay." matches nothing). Each match names shard, owner, document and entry count;
        documents removed but not compacted yet are reported with ``live: false``."""
        if (document_id is None) == (text is None):
            raise RemovalError("lookup: give exactly one of document_id or text", "document_id")
        if text is not None and not _norm(text):
            raise RemovalError("text: empty passage", "text")
        manifest = read_manifest(self.path)
        passage = _norm(text) if text is not None else ""
        qsents = {_norm(s) for s in split_sentences(text)} if text is not None else set()
        qsents = {s for s in qsents if len(s) >= min_sentence_chars}
        matches = []
        for rec in manifest["shards"]:
            removed = set(rec.get("removed_docs", []))
            for d in read_documents(self.path / rec["dir"]):
                how, n_sent = None, 0
                if document_id is not None:
                    how = "id" if d["id"] == document_id else None
                else:
                    if passage in _norm(d["text"]):
                        how = "passage"
                    if qsents:
                        n_sent = len(qsents & {_norm(d["text"][a:b]) for a, b in d["sentences"]})
                        how = how or ("sentences" if n_sent else None)
                if how:
                    matches.append({"shard": rec["name"], "owner": d["owner"], "document_id": d["id"],
                                    "doc_index": d["index"], "title": d.get("title", ""), "match": how,
                                    "matched_sentences": n_sent, "entries": int(d["tokens"]),
                                    "live": d["index"] not in removed})
        live = [m for m in matches if m["live"]]
        out = {"generation": int(manifest["generation"]), "in_store": bool(live),
               "shards": sorted({m["shard"] for m in live}), "entries": sum(m["entries"] for m in live),
               "matches": matches}
        if text is not None:
            out["query_sentences"] = len(qsents)
        return out

    # ------------------------------------------------------------------------------ receipt
    def _after(self, state: dict, manifest: dict) -> list[dict]:
        names = {x["name"] for x in state["targets"]["drop_shards"] + state["targets"]["drop_documents"]}
        out = []
        for name in sorted(names):
            rec = next((r for r in manifest["shards"] if r["name"] == name), None)
            out.append({"name": name, "dir": rec["dir"], "entries": rec.get("entries"), "checksum": rec.get("checksum"),
                        "present": True} if rec else {"name": name, "present": False})
        return out

    def _write_receipt(self, state: dict) -> dict:
        """The receipt: what was asked, what was removed (ids, counts, checksums before/after),
        generations, timestamps, verification and the journal head. It holds no removed text."""
        rid = state["request"]["request_id"]
        manifest = read_manifest(self.path)
        t = state["targets"]
        jrecs = read_journal(self.path / "journal.jsonl")
        mine = [r for r in jrecs if r.get("request_id") == rid]
        receipt = {
            "request_id": rid, "request": state["request"], "status": state["status"], "store": str(self.path),
            "removed": {
                "shards": [{k: x[k] for k in ("name", "owner", "entries", "documents")} for x in t["drop_shards"]],
                "documents": [{"shard": x["name"], "document_ids": x["document_ids"], "entries": x["removed_entries"]}
                              for x in t["drop_documents"]],
                "entries": t["entries"],
            },
            "shards_before": [{"name": x["name"], "dir": x["dir"], "entries": x["entries"], "checksum": x["checksum"]}
                              for x in t["drop_shards"] + t["drop_documents"]],
            "shards_after": self._after(state, manifest),
            "generations": {"before": state["generation_before"], "applied": state.get("generation_applied"),
                            "compacted": state.get("generation_compacted"), "current": int(manifest["generation"])},
            "timestamps": dict(state.get("timestamps", {}), receipt=_now()),
            "verification": state.get("verification"),
            "journal": [{"seq": r["seq"], "event": r["event"], "hash": r["hash"]} for r in mine],
        }
        self.receipts_dir.mkdir(exist_ok=True)
        path = self.receipts_dir / f"{rid}.json"
        write_json_atomic(path, receipt)
        self._journal_once(f"removal_receipt_{state['status']}", rid, receipt_sha256=sha256_file(path))
        return receipt


# --------------------------------------------------------------------------------------------- functions

def verify_store_journal(store_path: str | Path) -> tuple[bool, str, int]:
    """Check the store's journal hash chain; the message names the first bad record and its event."""
    from .journal import verify_journal

    jpath = Path(store_path) / "journal.jsonl"
    if not jpath.exists():
        return False, f"{jpath}: no journal", 0
    ok, msg, n = verify_journal(jpath)
    if not ok:
        m = re.match(r"record (\d+):", msg)
        if m:
            try:
                rec = read_journal(jpath)[int(m.group(1))]
                msg += f" [event {rec.get('event')!r}" + (f", request {rec['request_id']!r}]" if rec.get("request_id") else "]")
            except Exception:
                pass
    return ok, f"{jpath}: {msg}", n
