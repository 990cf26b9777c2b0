"""silo.v1.DataOwner: removal requests, their status and receipts, and membership lookup.

Authorisation (documented in the proto too):
  * the admin token may do everything;
  * an owner token (``serve.owner_tokens``: owner -> token, or ``sha256:<hex>`` of the token so the config
    never holds the secret itself) may remove, and read the removals of, that owner's content only;
  * ``Lookup`` is open to everyone when ``serve.public_lookup`` is true: the public sees counts only (how
    much of its own passage the store holds), an owner token also the ids of its own matching documents,
    the admin everything. Lookups match whole sentences by hash (datastore/lookup.py), never text, and at
    most ``serve.max_lookups`` run at once (RESOURCE_EXHAUSTED beyond).

A removal is recorded and applied on disk by the RPC thread (under the server's store lock, which Admin
swaps and reloads share, so a stale snapshot can never be swapped back in), the new generation is opened
there too and swapped in on the engine's worker between two requests: it is live for every request that
starts after SubmitRemoval returns, and a request in flight finishes on the snapshot it started with.
Compaction then runs on a background thread and the model-based verification on the worker; GetRemoval
follows received -> applied -> compacted -> verified, or failed with the persisted reason. A server
started on a store with unfinished removals finishes them first; draining waits for them (a process
killed meanwhile leaves a store that the next start resumes).

The contribution ledger (serve.ledger) is read here too (`GetLedger`: an owner its own line, the admin
every owner's), and an applied owner removal stops that owner's credit from then on (history kept).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading

import grpc

from silo.datastore.format import Manifest, StoredDocument
from silo.datastore.lookup import lookup
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import (
    Receipt, RemovalError, RemovalForbidden, RemovalRequest, RemovalState, RemovalTargets,
)
from silo.workflows.removal import PendingRemoval, RemovalWorkflow

from .gen import silo_pb2 as pb
from .gen import silo_pb2_grpc as pb_grpc
from .rpc import RpcFailure, _handled

log = logging.getLogger("silo.serving.dataowner")
Code = grpc.StatusCode


def token_matches(given: str, configured: str) -> bool:
    """Constant-time check of a presented token against a configured value (plain or sha256:<hex>)."""
    if configured.startswith("sha256:"):
        digest = hashlib.sha256(given.encode()).hexdigest()
        return hmac.compare_digest(digest, configured[len("sha256:"):].lower())
    return hmac.compare_digest(given.encode(), configured.encode())


class UnknownToken(RpcFailure):
    """A well-formed bearer token that is neither the admin token nor an owner token (PERMISSION_DENIED
    on gRPC, as ever; 401 on the HTTP door, where an unknown API key is an authentication failure)."""

    def __init__(self):
        super().__init__(Code.PERMISSION_DENIED, "token not recognised (neither the admin token nor an owner token)")


def resolve_caller(server, authorization: str | None, optional: bool = False) -> tuple[str, str | None] | None:
    """The caller behind an `authorization` value (both doors): ("admin", None) or ("owner", name); None when
    no token was given and `optional`."""
    if not authorization:
        if optional:
            return None
        raise RpcFailure(Code.UNAUTHENTICATED, "missing call metadata 'authorization: Bearer <token>' "
                                               "(the admin token or the data owner's token)")
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        raise RpcFailure(Code.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
    admin = server.admin_token
    if admin is not None and hmac.compare_digest(value.encode(), admin.encode()):
        return ("admin", None)
    for owner, configured in server.cfg.resolved_owner_tokens().items():
        if token_matches(value, configured):
            return ("owner", owner)
    raise UnknownToken()


def check_generation_access(server, authorization: str | None) -> str | None:
    """Generation on either door: open while `serve.api_tokens` is empty (the token, if any, is ignored);
    else a client, owner or admin token is needed. Returns the caller's name, when known."""
    tokens = server.cfg.api_tokens
    if not tokens:
        return None
    given = (authorization or "").partition(" ")[2].strip()
    for name, configured in tokens.items():
        if given and configured and token_matches(given, configured):
            return name
    try:
        caller = resolve_caller(server, authorization)
    except UnknownToken:
        raise RpcFailure(Code.UNAUTHENTICATED, "token not recognised (generation needs a client token of "
                                               "serve.api_tokens, an owner token or the admin token)") from None
    return caller[1] or caller[0]


class DataOwnerService(pb_grpc.DataOwnerServicer):
    def __init__(self, server):
        self.server = server
        self._threads: dict[str, threading.Thread] = {}
        self._lookups = threading.BoundedSemaphore(server.cfg.max_lookups)

    @property
    def _lock(self) -> threading.Lock:
        return self.server.store_lock  # shared with Admin's swaps and reloads

    # ----------------------------------------------------------------------------------- auth
    def _caller(self, context, optional: bool = False) -> tuple[str, str | None] | None:
        """("admin", None) or ("owner", name); None when no token was given and `optional`."""
        return resolve_caller(self.server, dict(context.invocation_metadata()).get("authorization"), optional)

    def _manager(self) -> RemovalManager:
        engine = self.server.engine
        if engine is None:
            raise RpcFailure(Code.UNAVAILABLE, "the model is still loading; retry shortly")
        if engine.lm.store is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "no datastore is attached to this server")
        return RemovalManager(engine.lm.store.path)

    def _check_owner_may(self, caller, targets: RemovalTargets, removed: list[StoredDocument]) -> None:
        """An owner token may only remove its own content: the documents the request removes and the
        shards it drops (a shard whose documents are all tombstoned still has an owner)."""
        if caller[0] == "admin":
            return
        owners = {d.owner for d in removed} | {x.owner for x in targets.drop_shards if x.owner}
        if owners - {caller[1]}:
            raise RpcFailure(Code.PERMISSION_DENIED,
                             f"an owner token for '{caller[1]}' may only remove that owner's content; "
                             f"this request touches content of {', '.join(sorted(owners - {caller[1]}))}")

    # ----------------------------------------------------------------------------------- conversion
    def _status_message(self, mgr: RemovalManager, state: RemovalState, generation: int | None = None) -> pb.RemovalStatus:
        """`generation`: the store's current generation, when the caller has read it already."""
        r = state.request
        status = state.status
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
        if caller[0] == "owner" and caller[1] not in state.owners():
            raise RpcFailure(Code.PERMISSION_DENIED, f"request {request_id} is not about content of '{caller[1]}'")
        return state

    # ----------------------------------------------------------------------------------- RPCs
    # Each RPC resolves its caller, then calls the action below it; the HTTP door (serving/http) calls the
    # same actions with the caller it resolved from its own Authorization header.
    @_handled("SubmitRemoval")
    def SubmitRemoval(self, request, context, info):
        return self.submit(self._caller(context), request, info)

    def submit(self, caller, request, info: dict) -> pb.RemovalStatus:
        mgr = self._manager()
        engine = self.server.engine
        try:
            req = RemovalRequest(owner=request.owner or None, document_ids=list(request.document_ids),
                                 shards=list(request.shards), requester=request.requester, reason=request.reason,
                                 request_id=request.request_id)
        except RemovalError as exc:
            raise RpcFailure(Code.INVALID_ARGUMENT, str(exc)) from None
        info.update(request_id=req.request_id, kind=req.kind, caller=caller[1] or caller[0])
        workflow = self._workflow(engine)
        with self._lock:
            try:
                pending = workflow.prepare(req, owner=caller[1] if caller[0] == "owner" else None)
            except RemovalForbidden as exc:
                raise RpcFailure(Code.PERMISSION_DENIED, str(exc)) from None
            except RemovalError as exc:
                raise RpcFailure(Code.INVALID_ARGUMENT, str(exc)) from None
            self._check_owner_may(caller, pending.targets, pending.removed)
            state = workflow.apply(pending)  # live for every request after this returns
            if req.kind == "owner" and self.server.ledger is not None:
                self.server.ledger.mark_removed(req.owner, req.request_id)
        t = threading.Thread(target=self._finish, name=f"removal-{req.request_id}", daemon=True,
                             args=(workflow, pending, not request.skip_verification))
        self._threads[req.request_id] = t
        t.start()
        if request.wait:
            t.join()
            state = mgr.status(req.request_id)
        info["status"] = state.status
        return self._status_message(mgr, state)

    @staticmethod
    def _workflow(engine) -> RemovalWorkflow:
        return RemovalWorkflow(engine.lm, on_model=lambda fn: engine.control(fn, timeout=600))

    def _finish(self, workflow: RemovalWorkflow, pending: PendingRemoval, verify: bool) -> None:
        """Compact (bytes leave the disk), switch the model to the compacted generation, verify; a failure
        is persisted in the request's state (GetRemoval reports it, also after a restart)."""
        request_id = pending.request.request_id
        try:
            with self._lock:
                workflow.compact(pending)
            if verify:
                workflow.verify(pending)
            workflow.manager.record_error(request_id, None)
            log.info("removal finished", extra={"fields": {"event": "removal", "request_id": request_id,
                                                            "verified": verify}})
        except Exception as exc:  # noqa: BLE001 - reported through GetRemoval, never kills the server
            try:
                workflow.manager.record_error(request_id, f"{type(exc).__name__}: {exc}")
            finally:
                log.error("removal %s failed after it was applied", request_id, exc_info=exc)

    def resume_unfinished(self) -> list[str]:
        """At start: finish removals a previous process left unfinished (apply, compact, receipt), then
        serve the resulting generation. Returns their request ids."""
        engine = self.server.engine
        if engine is None or engine.lm.store is None:
            return []
        mgr = RemovalManager(engine.lm.store.path)
        done = []
        for rid in mgr.unfinished():
            with self._lock:
                try:
                    mgr.resume(rid)
                    mgr.record_error(rid, None)
                    done.append(rid)
                except Exception as exc:  # noqa: BLE001 - recorded; the server serves what is applied
                    mgr.record_error(rid, f"{type(exc).__name__}: {exc}")
                    log.error("could not finish removal %s at start", rid, exc_info=exc)
        if done:
            with self._lock:
                self._workflow(engine)._switch()
        if done:
            log.info("resumed unfinished removals", extra={"fields": {"event": "removal_resume", "requests": done}})
        return done

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait for background compaction/verification threads (tests, draining)."""
        for t in list(self._threads.values()):
            t.join(timeout)

    @_handled("GetRemoval")
    def GetRemoval(self, request, context, info):
        return self.get(self._caller(context), request.request_id)

    def get(self, caller, request_id: str) -> pb.RemovalStatus:
        mgr = self._manager()
        return self._status_message(mgr, self._load_state(mgr, caller, request_id))

    @_handled("GetReceipt")
    def GetReceipt(self, request, context, info):
        state, receipt = self.receipt(self._caller(context), request.request_id)
        return pb.Receipt(request_id=request.request_id, status=state.status, json=json.dumps(receipt.to_json(), indent=1))

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
            if caller[0] == "owner" and caller[1] not in owners:
                continue
            if owner and owner not in owners:
                continue
            out.removals.append(self._status_message(mgr, state, generation))
        return out

    def sync_ledger(self, store_path) -> None:
        """Mark in the ledger every owner removed from the store (removal records, e.g. removals made with
        `silo datastore remove` while no server ran), so they get no new credit."""
        for state in RemovalManager(store_path).list():
            r = state.request
            if r.kind == "owner" and r.owner and state.status in ("applied", "compacted", "verified"):
                self.server.ledger.mark_removed(r.owner, r.request_id)

    @_handled("GetLedger")
    def GetLedger(self, request, context, info):
        caller = self._caller(context)
        ledger = self.server.ledger
        if ledger is None:
            raise RpcFailure(Code.FAILED_PRECONDITION, "this server keeps no contribution ledger (serve.ledger)")
        owner = request.owner or None
        if caller[0] == "owner":
            if owner and owner != caller[1]:
                raise RpcFailure(Code.PERMISSION_DENIED, f"an owner token for '{caller[1]}' reads only that "
                                                         f"owner's ledger line, not '{owner}'")
            owner = caller[1]
        out = pb.LedgerResponse(responses=ledger.responses() if caller[0] == "admin" else 0)
        for t in ledger.totals(owner):
            out.owners.append(pb.OwnerCredit(**vars(t)))
        info.update(caller=caller[1] or caller[0], owners=len(out.owners))
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
