"""Opt-out: the removal state machine. Recorded, exact, crash-safe removal of a data owner's content.

A removal request names an owner, document ids or shards, plus who asked and why. Its life::

    received  -> the request is validated against the store, saved (removals/<id>.json) and journaled
    applied   -> a new manifest generation no longer serves the content: whole shards are dropped from
                 manifest.json (their folders deleted), documents are tombstoned in the shard's
                 ``removed_docs`` (Datastore.open filters them with a FAISS IDSelector at once)
    compacted -> tombstoned documents are rewritten out of their shard into a NEW folder
                 ``shards/<name>@g<generation>`` (`shard.compact_shard`, `blocks.compact_blocks`), the
                 manifest points to it and the old folder is deleted, so the removed text is in no file
                 any more; a receipt is written (receipts/<id>.json)
    verified  -> `silo.workflows.removal` checked with the LM that nothing of it is retrieved or
                 reproduced and added the results to the receipt

Crash safety: files are never changed in place. manifest.json, request states and receipts are replaced
whole; a compacted shard is written to a folder no manifest references until the manifest switch; old
folders are deleted only after the switch. A process killed at any point leaves a store that opens as
the old or the new generation, and `resume` / `resume_all` finish the request: every step checks the
manifest first and does only what is still missing, and folders under ``shards/`` that the manifest does
not reference are garbage. Mutations hold an exclusive lock (``.removal.lock``) so a CLI and a server
cannot interleave manifest writes.

``SILO_CRASH_AT=<point>`` makes the process exit (status 77) at that point, for crash tests; the points
are listed in `CRASH_POINTS`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from silo.core.files import crash_point, fsync_path, sha256_file, write_json_atomic

from .blocks import compact_blocks, has_blocks
from .infgram import compact_infgram, has_infgram
from .format import Manifest, ShardRecord, StoredDocument, now, store_lock
from .indexing import keys_digest, quantizer_is_stale, reindex_shards, remove_unreferenced
from .journal import JournalRecord, append_journal, read_journal
from .keys_store import has_keys
from .removal_records import (
    REQUEST_ID_RE, Generations, JournalLink, Receipt, RemovalError, RemovalForbidden, RemovalRequest, RemovalState,
    RemovalTargets, Removed, ShardTarget, ShardVersion, listing,
)
from .shard import compact_shard, read_documents

CRASH_POINTS = (
    "after_journal_received",  # request saved + journaled, manifest untouched
    "after_manifest_write",  # the removal generation is live, state still says "received"
    "mid_compaction_write",  # half of the new shard folder written, manifest still on the old folder
    "after_compaction_manifest_write",  # manifest points to the compacted folder, state still "applied"
    "before_old_shard_delete",  # manifest no longer references the old folder(s), they still exist
    "after_retrain_manifest_write",  # a store-trained quantizer retrained, state still "applied"
    "before_receipt",  # everything done except the receipt
)


def _shard_targets(req: RemovalRequest, recs: list[ShardRecord], owner: str | None) -> list[ShardTarget]:
    """The named shards, each once (with `owner`: only that owner's shards may be named)."""
    names = {r.name: r for r in recs}
    visible = {n for n, r in names.items() if owner is None or r.owner == owner}
    unknown = [s for s in req.shards if s not in names]
    foreign = [s for s in req.shards if s in names and s not in visible]
    if foreign:
        raise RemovalForbidden(f"shards: an owner token for {owner!r} may only remove that owner's shards", "shards")
    if unknown:
        raise RemovalError(f"shards: unknown shard(s) {listing(unknown)}; the store has {listing(visible)}", "shards")
    return [ShardTarget.of(names[s]) for s in dict.fromkeys(req.shards)]


def _document_target(rec: ShardRecord, hits: list[StoredDocument]) -> ShardTarget:
    """Shard `rec` with documents `hits` to tombstone: their ids, entries, owners and content hashes."""
    return ShardTarget.of(rec, document_ids=[d.id for d in hits], removed_entries=sum(d.tokens for d in hits),
                          document_owners=sorted({d.owner for d in hits}),
                          document_sha256=[d.sha256 for d in hits if d.sha256])


# --------------------------------------------------------------------------------------------- manager

class RemovalManager:
    """Removal requests against one store folder.

    Typical use (what `silo datastore remove --no-verify` does)::

        m = RemovalManager("runs/demo/store")
        m.submit(RemovalRequest(owner="gcide", requester="legal@x", reason="opt-out"))   # live at once
        receipt = m.compact(request_id)                                                  # bytes gone

    `silo.workflows.removal` adds the LM checks on top. Receipts are `Receipt` records (JSON in receipts/).
    """

    def __init__(self, store_path: str | Path):
        self.path = Path(store_path)
        Manifest.read(self.path)  # fail early, naming the path, if this is not a store
        self.removals_dir = self.path / "removals"
        self.receipts_dir = self.path / "receipts"

    # ------------------------------------------------------------------------------ state files
    def lock(self):
        """The store's mutation lock (`format.store_lock`): one writer at a time, across processes."""
        return store_lock(self.path)

    def _state_path(self, request_id: str) -> Path:
        if not isinstance(request_id, str) or not REQUEST_ID_RE.match(request_id):
            raise RemovalError(f"request_id: not a valid request id ({request_id!r})", "request_id")
        return self.removals_dir / f"{request_id}.json"

    def _load(self, request_id: str) -> RemovalState:
        p = self._state_path(request_id)
        if not p.exists():
            raise RemovalError(f"request_id: no removal request {request_id!r} in the store {self.path.name!r} "
                               "(`silo datastore removals` lists them)", "request_id")
        return RemovalState.from_json(json.loads(p.read_text(encoding="utf-8")))

    def _save(self, state: RemovalState) -> None:
        self.removals_dir.mkdir(exist_ok=True)
        state.updated = now()
        write_json_atomic(self._state_path(state.request_id), state.to_json())

    def _set_status(self, state: RemovalState, status: str, **extra) -> None:
        state.status = status
        state.timestamps[status] = now()
        for k, v in extra.items():
            setattr(state, k, v)
        self._save(state)

    def _journal_once(self, event: str, request_id: str, **details) -> JournalRecord:
        """Append a journal record unless this request already has one for `event` (resume after a
        crash between the journal append and the state save must not log a step twice)."""
        jpath = self.path / "journal.jsonl"
        for rec in reversed(read_journal(jpath)):
            if rec.event == event and rec.request_id == request_id:
                return rec
        return append_journal(jpath, event, request_id=request_id, **details)

    # ------------------------------------------------------------------------------ resolve
    def resolve(self, request: RemovalRequest | dict, manifest: Manifest | None = None,
                owner: str | None = None) -> RemovalTargets:
        """What the request removes in the current generation, or RemovalError naming the field and
        listing what exists. Owner and shard requests read only manifest.json (so their cost does not
        depend on the rest of the store); document requests read documents.jsonl of the shards.

        With `owner` (a data owner asking through its token) only that owner's content is considered and
        listed: asking for anything else raises `RemovalForbidden`, and errors never name other owners'
        shards or documents."""
        req = RemovalRequest.coerce(request)
        manifest = manifest or Manifest.read(self.path)
        drop: list[ShardTarget] = []
        docs: list[ShardTarget] = []
        if req.kind == "shards":
            drop = _shard_targets(req, manifest.shards, owner)
        elif req.kind == "owner":
            drop, docs = self._owner_targets(req, manifest.shards, owner)
        else:
            docs = self._document_targets(req, manifest.shards, owner)
        entries = sum(t.entries for t in drop) + sum(t.removed_entries for t in docs)
        return RemovalTargets(drop_shards=drop, drop_documents=docs, entries=entries,
                              generation=int(manifest.generation))

    def _owner_targets(self, req: RemovalRequest, recs: list[ShardRecord],
                       owner: str | None) -> tuple[list[ShardTarget], list[ShardTarget]]:
        """An owner's shards, and its documents in domain-sharded shards (shard owner ""), which mix owners
        and so are tombstoned document by document."""
        if owner is not None and req.owner != owner:
            raise RemovalForbidden(f"owner: an owner token for {owner!r} may only remove that owner's content "
                                   f"(asked for {req.owner!r})", "owner")
        drop = [ShardTarget.of(r) for r in recs if r.owner == req.owner]
        docs = []
        owners = {r.owner for r in recs if r.owner}
        for rec in (r for r in recs if not r.owner):
            removed = set(rec.removed_docs)
            stored = read_documents(self.path / rec.dir)
            owners.update(d.owner for d in stored)
            hits = [d for d in stored if d.owner == req.owner and d.index not in removed]
            if hits:
                docs.append(_document_target(rec, hits))
        if not drop and not docs:
            raise RemovalError(f"owner: no content of owner {req.owner!r} in the store"
                               + (f"; owners present: {listing(owners)}" if owner is None else ""), "owner")
        return drop, docs

    def _document_targets(self, req: RemovalRequest, recs: list[ShardRecord],
                          owner: str | None) -> list[ShardTarget]:
        """The shards holding the requested live documents (with `owner`: among that owner's only)."""
        wanted = set(req.document_ids)
        docs, visible_ids = [], []
        for rec in recs:
            removed = set(rec.removed_docs)
            # a removed document is not "in the store"; another owner's is neither removable nor named to an owner
            visible = [d for d in read_documents(self.path / rec.dir)
                       if d.index not in removed and (owner is None or d.owner == owner)]
            visible_ids += [d.id for d in visible]
            hits = [d for d in visible if d.id in wanted]
            if hits:
                docs.append(_document_target(rec, hits))
        found = {i for t in docs for i in t.document_ids}
        unknown = [x for x in req.document_ids if x not in found]
        if unknown and owner is None:
            raise RemovalError(f"document_ids: not in the store: {listing(unknown)}; documents present: "
                               f"{listing(visible_ids)}", "document_ids")
        if unknown:
            # an owner is told only about its own documents: an id of another owner's document and an id
            # that exists nowhere read the same, so the answer reveals nothing about other owners
            raise RemovalForbidden(f"document_ids: not among the documents of {owner!r}: {listing(unknown)} "
                                   f"(an owner token may only remove its own documents); its documents: "
                                   f"{listing(visible_ids)}", "document_ids")
        return docs

    # ------------------------------------------------------------------------------ submit / apply
    def submit(self, request: RemovalRequest | dict, rollout_required: bool = False) -> RemovalState:
        """Record the request (journal ``removal_received``) and apply it; returns the state (status
        ``applied``). Nothing is changed when validation fails. `rollout_required`: the store is served by
        a cluster whose steps count only once rolled out to every replica (`record_rollout`)."""
        req = RemovalRequest.coerce(request)
        with self.lock():
            if self._state_path(req.request_id).exists():
                raise RemovalError(f"request_id: {req.request_id!r} already exists in the store {self.path.name!r}",
                                   "request_id")
            targets = self.resolve(req)
            state = RemovalState(request=req, status="received", timestamps={"received": now()}, targets=targets,
                                 generation_before=targets.generation, store=str(self.path),
                                 rollout_required=rollout_required)
            self._save(state)
            self._journal_received(state)
            crash_point("after_journal_received")
            return self._apply(state)

    def _journal_received(self, state: RemovalState) -> None:
        r = state.request
        self._journal_once("removal_received", r.request_id,
                           **{k: getattr(r, k) for k in ("kind", "owner", "document_ids", "shards", "requester", "reason")},
                           entries=state.targets.entries, generation=state.targets.generation)

    def _apply(self, state: RemovalState) -> RemovalState:
        """Make the content unreachable in a new generation (idempotent: checks the manifest first)."""
        rid = state.request_id
        t = state.targets
        manifest = Manifest.read(self.path)
        drop_names = {x.name for x in t.drop_shards}
        recs = [r for r in manifest.shards if r.name not in drop_names]
        changed = len(recs) != len(manifest.shards)
        for target in t.drop_documents:
            rec = next((r for r in recs if r.name == target.name), None)
            if rec is None:
                continue  # the whole shard went meanwhile
            ids = set(target.document_ids)
            removed = set(rec.removed_docs)
            # Indices are re-read by id: a compaction by another request may have renumbered them.
            new = {d.index for d in read_documents(self.path / rec.dir) if d.id in ids} - removed
            if new:
                rec.removed_docs = sorted(removed | new)
                changed = True
        if changed:
            manifest.shards = recs
            manifest.next_generation()
            manifest.write(self.path)
            crash_point("after_manifest_write")
        gen = int(Manifest.read(self.path).generation)
        self._journal_once("removal_applied", rid, generation=gen,
                           dropped_shards=sorted(drop_names),
                           tombstoned={x.name: x.document_ids for x in t.drop_documents})
        if state.status == "received":
            self._set_status(state, "applied", generation_applied=gen)
        if t.drop_shards:
            crash_point("before_old_shard_delete")
            self.collect_garbage(manifest=Manifest.read(self.path))
        return state

    # ------------------------------------------------------------------------------ compact
    def compact(self, request_id: str) -> Receipt:
        """Rewrite the request's tombstoned documents out of their shards (new folders, manifest switch,
        old folders deleted) and write the receipt; returns the receipt. Whole-shard removals have
        nothing to rewrite (their folders went at apply). Idempotent."""
        with self.lock():
            state = self._load(request_id)
            if state.status == "received":
                raise RemovalError(f"request {request_id!r} is not applied yet; run resume", "request_id")
            return self._compact(state)

    def _compact(self, state: RemovalState) -> Receipt:
        rid = state.request_id
        if state.status == "applied":
            for target in state.targets.drop_documents:
                self._compact_shard(target.name)
            crash_point("before_old_shard_delete")
            self.collect_garbage()
            retrained = self._retrain_quantizer(state)
            manifest = Manifest.read(self.path)
            self._journal_once("removal_compacted", rid, generation=int(manifest.generation),
                               shards=[x.to_json() for x in self._after(state, manifest)],
                               **({"retrained": retrained} if retrained else {}))
            if retrained:
                state.retrained = retrained
            self._set_status(state, "compacted", generation_compacted=int(manifest.generation))
        crash_point("before_receipt")
        return self._ensure_receipt(state)

    def _ensure_receipt(self, state: RemovalState) -> Receipt:
        """The receipt for the state's status; an existing one is kept (its hash is in the journal)."""
        path = self.receipts_dir / f"{state.request_id}.json"
        if path.exists():
            receipt = Receipt.from_json(json.loads(path.read_text(encoding="utf-8")))
            if receipt.status == state.status:
                self._journal_once(f"removal_receipt_{state.status}", state.request_id,
                                   receipt_sha256=sha256_file(path))
                return receipt
        return self._write_receipt(state)

    def _compact_shard(self, name: str) -> None:
        """Rewrite shard `name` without its tombstoned documents into shards/<name>@g<gen>, then switch
        the manifest to it."""
        manifest = Manifest.read(self.path)
        rec = manifest.shard(name)
        if rec is None or not rec.removed_docs:
            return  # gone, or already compacted (resume after the manifest switch)
        gen = int(manifest.generation) + 1
        new_rec, remap = compact_shard(self.path, rec, f"shards/{name}@g{gen}")
        old_dir, new_dir = self.path / rec.dir, self.path / new_rec.dir
        if has_blocks(old_dir):
            compact_blocks(old_dir, new_dir, remap, new_rec.checksum)
        if has_infgram(old_dir):  # the inf-gram index is rebuilt from the compacted entries
            compact_infgram(old_dir, new_dir, new_rec.checksum)
        fsync_path(new_dir)
        fsync_path(new_dir.parent)
        manifest.shards = [new_rec if r.name == name else r for r in manifest.shards]
        manifest.generation = gen
        manifest.updated = now()
        manifest.write(self.path)
        crash_point("after_compaction_manifest_write")

    def _retrain_quantizer(self, state: RemovalState) -> dict | None:
        """A quantizer trained on keys sampled across the store still averages the removed keys: retrain it
        from the keys that stay, with the build's sample size and seed, and rebuild every shard's index from
        its stored keys (new folders, one manifest write, the old ones deleted), so the store equals a build
        without the removed content. A pass over the whole store; a quantizer trained on `train_corpus`
        keys (no store owner's) is kept and this costs nothing. Idempotent: a quantizer already trained on
        the current keys is kept (resume after a crash)."""
        manifest = Manifest.read(self.path)
        if not quantizer_is_stale(self.path, manifest):
            return self._retrained_before_crash(manifest, state)
        t0 = time.time()
        unkept = [r.name for r in manifest.shards if not has_keys(self.path / r.dir)]
        if unkept:  # a store built before shards kept their keys: nothing to retrain from; said in the receipt
            return {"skipped": f"shards {', '.join(unkept[:5])} keep no keys (keys.npy; built before they existed): "
                               "the quantizer still holds what the removed keys added until the store is rebuilt"}
        if not manifest.shards:  # nothing left to train on: the quantizer goes with the last shard
            manifest.index.quantizer, manifest.index.trained_keys = None, None
            recs, name, train_s = [], None, 0.0
        else:
            gen = int(manifest.generation) + 1
            ix = manifest.index
            recs, name, train_s = reindex_shards(self.path, manifest, ix.factory, ix.train_sample or 200_000, gen)
            manifest.shards, manifest.index.quantizer = recs, name
            manifest.index.trained_keys = keys_digest(self.path, recs)
        manifest.next_generation()
        manifest.write(self.path)
        crash_point("after_retrain_manifest_write")
        self.collect_garbage(manifest)
        return {"quantizer": manifest.index.quantizer, "generation": int(manifest.generation),
                "train_sample": manifest.index.train_sample, "keys": sum(r.entries for r in recs),
                "train_seconds": round(train_s, 2), "seconds": round(time.time() - t0, 2)}

    @staticmethod
    def _retrained_before_crash(manifest: Manifest, state: RemovalState) -> dict | None:
        """The record of a retraining this request finished before a crash cut it short (its quantizer is
        newer than the request's "applied" generation), so the receipt still says so; else None."""
        name = manifest.index.quantizer or ""
        gen = name.removeprefix("quantizer@g").removesuffix(".faiss")
        if manifest.index.trained_on != "store" or not gen.isdigit() or int(gen) <= (state.generation_applied or 0):
            return None
        return {"quantizer": name, "generation": int(gen), "train_sample": manifest.index.train_sample,
                "keys": sum(r.entries for r in manifest.shards), "resumed": True}

    # ------------------------------------------------------------------------------ gc / resume
    def collect_garbage(self, manifest: Manifest | None = None) -> list[str]:
        """Delete folders under shards/ and quantizer files that the manifest does not reference (dropped or
        superseded shards, half-written compactions or retrainings) and stray temp files. Lists one folder;
        reads no shard."""
        manifest = manifest or Manifest.read(self.path)
        gone = remove_unreferenced(self.path, manifest)
        for folder in (self.path, self.removals_dir, self.receipts_dir):
            for tmp in folder.glob(".*.tmp-*") if folder.exists() else []:
                tmp.unlink(missing_ok=True)
        return gone

    def resume(self, request_id: str) -> Receipt:
        """Finish an interrupted request (apply, compact, receipt: whatever is missing); returns the
        receipt. Safe to call on a finished request."""
        with self.lock():
            state = self._load(request_id)
            if state.status == "received":
                self._journal_received(state)
                state = self._apply(state)
            receipt = self._compact(state)
            self.collect_garbage()
            return receipt

    def unfinished(self) -> list[str]:
        """Requests a process left before compaction or without a receipt (`resume_all` finishes them)."""
        return [st.request_id for st in self.list()
                if st.status in ("received", "applied") or not (self.receipts_dir / f"{st.request_id}.json").exists()]

    def resume_all(self) -> list[Receipt]:
        """Resume every unfinished request (and collect garbage); returns their receipts."""
        out = [self.resume(rid) for rid in self.unfinished()]
        with self.lock():
            self.collect_garbage()
        return out

    # ------------------------------------------------------------------------------ queries
    def status(self, request_id: str) -> RemovalState:
        """The saved state of a request: request, status, timestamps, targets, generations."""
        return self._load(request_id)

    def list(self) -> list[RemovalState]:
        """Every request's state, oldest first."""
        if not self.removals_dir.exists():
            return []
        out = [RemovalState.from_json(json.loads(p.read_text(encoding="utf-8")))
               for p in self.removals_dir.glob("*.json")]
        return sorted(out, key=lambda s: (s.request.created, s.request_id))

    def receipt(self, request_id: str) -> Receipt:
        p = self.receipts_dir / f"{self._state_path(request_id).stem}.json"
        if not p.exists():
            st = self._load(request_id)  # names unknown ids
            raise RemovalError(f"request_id: {request_id!r} has no receipt yet (status {st.status}); "
                               "run resume", "request_id")
        return Receipt.from_json(json.loads(p.read_text(encoding="utf-8")))

    def record_error(self, request_id: str, error: str | None) -> None:
        """Persist why the work after "applied" failed (None clears it once it succeeds)."""
        with self.lock():
            state = self._load(request_id)
            if state.error != error:
                state.error = error
                self._save(state)

    def record_rollout(self, request_id: str, rollout: dict) -> None:
        """Keep the record of a generation this request produced being rolled out to a cluster's replicas
        (which replica acknowledged it when, which left rotation)."""
        with self.lock():
            state = self._load(request_id)
            state.rollouts.append(rollout)
            self._save(state)

    def record_verification(self, request_id: str, verification: dict) -> Receipt:
        """Attach LM verification results to the receipt (status ``verified``); journal
        ``removal_verified``. Returns the receipt."""
        with self.lock():
            state = self._load(request_id)
            if state.status not in ("compacted", "verified"):
                raise RemovalError(f"request {request_id!r} is {state.status}; compact it first", "request_id")
            self._journal_once("removal_verified", request_id, passed=bool(verification.get("passed")),
                               generation=int(Manifest.read(self.path).generation))
            self._set_status(state, "verified", verification=verification)
            return self._write_receipt(state)

    def record_exactness(self, request_id: str, report: dict) -> Receipt:
        """Attach the equivalence check and MUSE report (`silo.workflows.exactness`) to the request's state
        and receipt; journal ``removal_exactness`` with its verdict and the new receipt's hash (each run is
        journaled: a later run replaces the report, the chain keeps every verdict). Returns the receipt."""
        with self.lock():
            state = self._load(request_id)
            if state.status not in ("compacted", "verified"):
                raise RemovalError(f"request {request_id!r} is {state.status}; compact it first", "request_id")
            state.exactness = report
            self._save(state)
            receipt = self._write_receipt(state)
            append_journal(self.path / "journal.jsonl", "removal_exactness", request_id=request_id,
                           passed=bool(report.get("passed")), generation=int(Manifest.read(self.path).generation),
                           receipt_sha256=sha256_file(self.receipts_dir / f"{request_id}.json"))
            return receipt

    # ------------------------------------------------------------------------------ receipt
    def _after(self, state: RemovalState, manifest: Manifest) -> list[ShardVersion]:
        out = []
        for name in sorted(state.targets.shard_names):
            rec = manifest.shard(name)
            out.append(ShardVersion.of(rec, present=True) if rec else ShardVersion.gone(name))
        return out

    def _write_receipt(self, state: RemovalState) -> Receipt:
        """The receipt: what was asked, what was removed (ids, counts, checksums before/after),
        generations, timestamps, verification and the journal head. It holds no removed text."""
        rid = state.request_id
        manifest = Manifest.read(self.path)
        t = state.targets
        mine = [r for r in read_journal(self.path / "journal.jsonl") if r.request_id == rid]
        receipt = Receipt(
            request_id=rid, request=state.request, status=state.status, store=self.path.name,
            removed=Removed.of(t), shards_before=tuple(ShardVersion.of(x) for x in t.drop_shards + t.drop_documents),
            shards_after=tuple(self._after(state, manifest)),
            generations=Generations(before=state.generation_before, applied=state.generation_applied,
                                    compacted=state.generation_compacted, current=int(manifest.generation)),
            timestamps=dict(state.timestamps, receipt=now()), verification=state.verification,
            journal=tuple(JournalLink(r.seq, r.event, r.hash) for r in mine),
            rollouts=list(state.rollouts) if state.rollout_required else None,
            retrained=state.retrained, exactness=state.exactness,
        )
        self.receipts_dir.mkdir(exist_ok=True)
        path = self.receipts_dir / f"{rid}.json"
        write_json_atomic(path, receipt.to_json())
        self._journal_once(f"removal_receipt_{state.status}", rid, receipt_sha256=sha256_file(path))
        return receipt
