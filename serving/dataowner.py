"""silo.v1.DataOwner: removal requests, their status and receipts, and membership lookup.

Authorisation (documented in the proto too):
  * the admin token may do everything;
  * an owner token (``serve.owner_tokens``: owner -> token, or ``sha256:<hex>`` of the token so the config
    never holds the secret itself) may remove, and read the removals of, that owner's content only;
  * ``Lookup`` is open to everyone when ``serve.public_lookup`` is true: the public sees counts only (how
    much of its own passage the store holds), an owner token also the ids of its own matching documents,
    the admin everything. Lookups match whole sentences by hash (datastore/lookup.py), never text, and at
    most ``serve.max_lookups`` run at once (RESOURCE_EXHAUSTED beyond).

A removal goes to the server's store writer (serving/writer.py; in a Ray cluster, the store controller):
recorded and applied on disk under the store lock, which swaps and reloads share (a stale snapshot can
never be swapped back in), the new generation opened and swapped in on the engine's worker between two
requests: it is live for every request that starts after SubmitRemoval returns, and a request in flight
finishes on the snapshot it started with.
Compaction then runs on a background thread and the model-based verification on the worker; GetRemoval
follows received -> applied -> compacted -> verified, or failed with the persisted reason. A server
started on a store with unfinished removals finishes them first; draining waits for them (a process
killed meanwhile leaves a store that the next start resumes).

The contribution ledger (serve.ledger) is read here too (`GetLedger`: an owner its own line, the admin
every owner's), and an applied owner removal stops that owner's credit from then on (history kept).
"""

from __future__ import annotations

import json
import logging
import threading

import grpc

from silo.datastore.format import Manifest
from silo.datastore.lookup import lookup
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import Receipt, RemovalError, RemovalRequest, RemovalState

from .auth import Caller, peer_host, resolve_caller
from .gen import silo_pb2 as pb
from .gen import silo_pb2_grpc as pb_grpc
from .rpc import RpcFailure, _handled

log = logging.getLogger("silo.serving.dataowner")
Code = grpc.StatusCode


def removed_owners(store_path) -> list[tuple[str, str]]:
    """(owner, request id) of every applied owner removal recorded in the store."""
    return [(st.request.owner, st.request.request_id) for st in RemovalManager(store_path).list()
            if st.request.kind == "owner" and st.request.owner and st.status in ("applied", "compacted", "verified")]


class DataOwnerService(pb_grpc.DataOwnerServicer):
    def __init__(self, server):
        self.server = server
        self._lookups = threading.BoundedSemaphore(server.cfg.max_lookups)

    # ----------------------------------------------------------------------------------- auth
    def _caller(self, context, optional: bool = False) -> Caller | None:
        """The admin or an owner; None when no token was given and `optional`."""
        return resolve_caller(self.server, dict(context.invocation_metadata()).get("authorization"), optional,
                              peer=peer_host(context.peer()))

    def _manager(self) -> RemovalManager:
        engine = self.server.engine
        if engine is None:
            raise RpcFailure(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        if engine.lm.store is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "no datastore is attached to this server")
        return RemovalManager(engine.lm.store.path)

    # ----------------------------------------------------------------------------------- conversion
    def _status_message(self, mgr: RemovalManager, state: RemovalState, generation: int | None = None) -> pb.RemovalStatus:
        """`generation`: the store's current generation, when the caller has read it already."""
        r = state.request
        status = state.served_status
        error = state.error or ""
        if error and status != "verified":
            status = "failed"
        msg = pb.RemovalStatus(request_id=r.request_id, status=status, kind=r.kind, owner=r.owner or "",
                               document_ids=r.document_ids, shards=r.shards, requester=r.requester,
                               created=r.created, entries=int(state.targets.entries),
                               generation=generation if generation is not None else int(Manifest.read(mgr.path).generation),
                               error=error)
        if state.verification is not None:
            msg.verification_passed = bool(state.verification.get("passed"))
        return msg

    def _load_state(self, mgr: RemovalManager, caller, request_id: str) -> RemovalState:
        if not request_id:
            raise RpcFailure(Code.INVALID_ARGUMENT, "request_id: required")
        try:
            state = mgr.status(request_id)
        except RemovalError as exc:
            raise RpcFailure(Code.NOT_FOUND, str(exc)) from None
        if caller.role == "owner" and caller.name not in state.owners():
            raise RpcFailure(Code.PERMISSION_DENIED, f"request {request_id} is not about content of '{caller.name}'")
        return state

    # ----------------------------------------------------------------------------------- RPCs
    # Each RPC resolves its caller, then calls the action below it; the HTTP door (serving/http) calls the
    # same actions with the caller it resolved from its own Authorization header.
    @_handled("SubmitRemoval")
    def SubmitRemoval(self, request, context, info):
        return self.submit(self._caller(context), request, info)

    def submit(self, caller, request, info: dict) -> pb.RemovalStatus:
        """Hand a removal to the server's store writer (this process's, or a cluster's controller): valid and
        permitted, it is live for every request that starts after this returns."""
        mgr = self._manager()
        try:
            req = RemovalRequest(owner=request.owner or None, document_ids=list(request.document_ids),
                                 shards=list(request.shards), requester=request.requester, reason=request.reason,
                                 request_id=request.request_id)
        except RemovalError as exc:
            raise RpcFailure(Code.INVALID_ARGUMENT, str(exc)) from None
        info.update(request_id=req.request_id, kind=req.kind, caller=caller.name or caller.role)
        state = self.server.writer.submit_removal(caller, req, verify=not request.skip_verification,
                                                  wait=request.wait)
        info["status"] = state.served_status
        return self._status_message(mgr, state)

    def resume_unfinished(self) -> list[str]:
        """At start: finish removals a previous process left unfinished (see LocalWriter)."""
        return self.server.writer.resume_unfinished()

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait for background compaction/verification threads (tests, draining)."""
        self.server.writer.wait_background(timeout)

    def finishing(self, request_id: str) -> bool:
        """Is the request's compaction or verification still running?"""
        return self.server.writer.finishing(request_id)

    @_handled("GetRemoval")
    def GetRemoval(self, request, context, info):
        return self.get(self._caller(context), request.request_id)

    def get(self, caller, request_id: str) -> pb.RemovalStatus:
        mgr = self._manager()
        return self._status_message(mgr, self._load_state(mgr, caller, request_id))

    def state(self, caller, request_id: str) -> RemovalState:
        """The saved state of a request the caller may see (the owners' page shows its timestamps)."""
        return self._load_state(self._manager(), caller, request_id)

    @_handled("GetReceipt")
    def GetReceipt(self, request, context, info):
        state, receipt = self.receipt(self._caller(context), request.request_id)
        return pb.Receipt(request_id=request.request_id, status=state.served_status,
                          json=json.dumps(receipt.to_json(), indent=1))

    def receipt(self, caller, request_id: str) -> tuple[RemovalState, Receipt]:
        mgr = self._manager()
        state = self._load_state(mgr, caller, request_id)
        try:
            return state, mgr.receipt(request_id)
        except RemovalError as exc:
            raise RpcFailure(Code.FAILED_PRECONDITION, str(exc)) from None

    @_handled("ListRemovals")
    def ListRemovals(self, request, context, info):
        return self.list_for(self._caller(context), request.owner)

    def list_for(self, caller, owner: str = "") -> pb.ListRemovalsResponse:
        mgr = self._manager()
        out = pb.ListRemovalsResponse()
        generation = int(Manifest.read(mgr.path).generation)  # once, not once per request listed
        for state in mgr.list():
            owners = state.owners()
            if caller.role == "owner" and caller.name not in owners:
                continue
            if owner and owner not in owners:
                continue
            out.removals.append(self._status_message(mgr, state, generation))
        return out

    def sync_ledger(self, store_path) -> None:
        """Mark in the ledger every owner removed from the store (removal records, e.g. removals made with
        `silo datastore remove` while no server ran), so they get no new credit."""
        for owner, request_id in removed_owners(store_path):
            self.server.ledger.mark_removed(owner, request_id)

    @_handled("GetLedger")
    def GetLedger(self, request, context, info):
        caller = self._caller(context)
        ledger = self.server.ledger
        if ledger is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "this server keeps no contribution ledger (serve.ledger)")
        owner = request.owner or None
        if caller.role == "owner":
            if owner and owner != caller.name:
                raise RpcFailure(Code.PERMISSION_DENIED, f"an owner token for '{caller.name}' reads only that "
                                                         f"owner's ledger line, not '{owner}'")
            owner = caller.name
        out = pb.LedgerResponse(responses=ledger.responses() if caller.role == "admin" else 0)
        for t in ledger.totals(owner):
            out.owners.append(pb.OwnerCredit(**vars(t)))
        info.update(caller=caller.name or caller.role, owners=len(out.owners))
        return out

    @_handled("Lookup")
    def Lookup(self, request, context, info):
        return self.lookup_for(self._caller(context, optional=self.server.cfg.public_lookup), request, info)

    def lookup_for(self, caller, request, info: dict) -> pb.LookupResponse:
        """`caller` None: the public (counts only)."""
        role, owner = caller if caller is not None else ("public", None)
        engine = self.server.engine
        if engine is None:
            raise RpcFailure(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        store = engine.lm.store  # the snapshot being served: what a generation could use right now
        if store is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "no datastore is attached to this server")
        if bool(request.document_id) == bool(request.text):
            raise RpcFailure(Code.INVALID_ARGUMENT, "give exactly one of document_id or text")
        limit = self.server.cfg.max_prompt_chars
        if len(request.text) > limit or len(request.document_id) > 200:
            raise RpcFailure(Code.INVALID_ARGUMENT, f"text: at most {limit} characters (document_id: 200)")
        if not self._lookups.acquire(blocking=False):
            raise RpcFailure(Code.RESOURCE_EXHAUSTED, f"too many lookups in flight ({self.server.cfg.max_lookups}); "
                                                      "retry shortly")
        try:
            res = lookup(store, document_id=request.document_id or None, text=request.text or None)
        except RemovalError as exc:
            raise RpcFailure(Code.INVALID_ARGUMENT, str(exc)) from None
        finally:
            self._lookups.release()
        res = res.view(role, owner)
        info.update(role=role, in_store=res.in_store)
        out = pb.LookupResponse(in_store=res.in_store, entries=res.entries, shards=res.shards,
                                generation=res.generation, query_sentences=res.query_sentences,
                                matched_sentences=res.matched_sentences, matched_chars=res.matched_chars)
        for m in res.matches:
            out.matches.append(pb.LookupMatch(shard=m.shard, owner=m.owner, document_id=m.document_id,
                                              title=m.title, match=m.match, entries=m.entries, live=True,
                                              matched_sentences=m.matched_sentences))
        return out
