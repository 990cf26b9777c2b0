"""Who changes the store a server serves: removals, swaps and reloads, one at a time.

`LocalWriter` does it in this process (a plain `silo serve`, and the store controller of a Ray cluster):
removals through `RemovalWorkflow` (validate, apply, make the model serve the new generation, then compact
and verify on a background thread), swaps and reloads by opening the new snapshot and swapping it in where
the model lives. `on_switch(store)` is called after every generation the model switched to (the cluster's
controller rolls it out to every replica there before the change counts as done).

A replica of a cluster has no writer of its own: serving/cluster/replica.py hands every change to the
store controller.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import grpc

from silo.datastore.removal import (
    RemovalError, RemovalForbidden, RemovalManager, RemovalRequest, RemovalState, RemovalTargets,
)
from silo.datastore.removal_records import read_exclusions
from silo.datastore.store import Datastore, removal_violations
from silo.model.lm import SiloLM
from silo.workflows.removal import PendingRemoval, RemovalWorkflow

from .auth import Caller
from .rpc import RpcFailure

log = logging.getLogger("silo.serving.writer")
Code = grpc.StatusCode


def check_owner_may(caller: Caller, targets: RemovalTargets, removed: list) -> None:
    """An owner token may only remove its own content: the documents the request removes and the shards
    it drops (a shard whose documents are all tombstoned still has an owner)."""
    if caller.role == "admin":
        return
    owners = {d.owner for d in removed} | {x.owner for x in targets.drop_shards if x.owner}
    if owners - {caller.name}:
        raise RpcFailure(Code.PERMISSION_DENIED,
                         f"an owner token for '{caller.name}' may only remove that owner's content; "
                         f"this request touches content of {', '.join(sorted(owners - {caller.name}))}")


class LocalWriter:
    """The store's only writer in this process (see the module docstring). `lm` is the model whose store
    changes; `on_model(fn)` runs fn where the model may be touched (a server's engine worker, between two
    requests); `store_lock` serialises every change; `ledger` (optional) stops an owner's credit once an
    owner removal is applied; `on_swap(prev, new, reason)` accounts for a swap (metrics, log);
    `replica_check` verifies a removal on a cluster's replicas (see RemovalWorkflow)."""

    def __init__(self, lm: SiloLM, on_model: Callable[[Callable[[], Any]], Any], store_lock: threading.Lock,
                 ledger=None, on_switch: Callable[[Datastore], None] | None = None,
                 on_swap: Callable[[Datastore | None, Datastore, str], None] | None = None,
                 replica_check: Callable[[PendingRemoval], dict] | None = None):
        self.lm = lm
        self.on_model = on_model
        self.store_lock = store_lock
        self.ledger = ledger
        self.on_switch = on_switch
        self.on_swap = on_swap
        self.replica_check = replica_check
        self._threads: dict[str, threading.Thread] = {}

    def workflow(self) -> RemovalWorkflow:
        return RemovalWorkflow(self.lm, on_model=self.on_model, store_lock=self.store_lock,
                               on_switch=self.on_switch, replica_check=self.replica_check)

    # ------------------------------------------------------------------------------ removals
    def submit_removal(self, caller: Caller, req: RemovalRequest, verify: bool = True, wait: bool = False
                       ) -> RemovalState:
        """Validate (RpcFailure naming what is wrong; nothing changes), apply (live for every request once
        this returns), then compact and verify on a background thread (`wait`: before returning)."""
        with self.store_lock:  # before the workflow takes the store's path: a swap cannot come between
            workflow = self.workflow()
            try:
                pending = workflow.prepare(req, owner=caller.name if caller.role == "owner" else None)
            except RemovalForbidden as exc:
                raise RpcFailure(Code.PERMISSION_DENIED, str(exc)) from None
            except RemovalError as exc:
                raise RpcFailure(Code.INVALID_ARGUMENT, str(exc)) from None
            check_owner_may(caller, pending.targets, pending.removed)
            state = workflow.apply(pending)
            if req.kind == "owner" and self.ledger is not None:
                self.ledger.mark_removed(req.owner, req.request_id)
        t = threading.Thread(target=self._finish, name=f"removal-{req.request_id}", daemon=True,
                             args=(workflow, pending, verify))
        self._threads[req.request_id] = t
        t.start()
        if wait:
            t.join()
            state = workflow.manager.status(req.request_id)
        return state

    def _finish(self, workflow: RemovalWorkflow, pending: PendingRemoval, verify: bool) -> None:
        """Compact (bytes leave the disk; the model switches to the compacted generation) and verify;
        `RemovalWorkflow.finish` persists a failure in the request's state (GetRemoval reports it, also
        after a restart)."""
        request_id = pending.request.request_id
        try:
            workflow.finish(pending, verify=verify)
        except Exception as exc:  # noqa: BLE001 - reported through GetRemoval, never kills the server
            log.error("removal %s failed after it was applied", request_id, exc_info=exc)
            return
        log.info("removal finished", extra={"fields": {"event": "removal", "request_id": request_id,
                                                        "verified": verify}})

    def resume_unfinished(self) -> list[str]:
        """At start: finish removals a previous process left unfinished (apply, compact, receipt), then
        serve the resulting generation. Returns their request ids."""
        if self.lm.store is None:
            return []
        mgr = RemovalManager(self.lm.store.path)
        done = []
        for rid in mgr.unfinished():
            with self.store_lock:
                try:
                    mgr.resume(rid)
                    mgr.record_error(rid, None)
                    done.append(rid)
                except Exception as exc:  # noqa: BLE001 - recorded; the server serves what is applied
                    mgr.record_error(rid, f"{type(exc).__name__}: {exc}")
                    log.error("could not finish removal %s at start", rid, exc_info=exc)
        if done:
            with self.store_lock:
                self.workflow().switch(*done)
            log.info("resumed unfinished removals", extra={"fields": {"event": "removal_resume", "requests": done}})
        return done

    def wait_background(self, timeout: float | None = None) -> None:
        """Wait for background compaction/verification threads (tests, draining)."""
        for t in list(self._threads.values()):
            t.join(timeout)

    def finishing(self, request_id: str) -> bool:
        """Is the request's compaction or verification still running here?"""
        thread = self._threads.get(request_id)
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------------------------ swaps
    def swap(self, path: str) -> tuple[Datastore | None, Datastore]:
        """Serve the store at `path` (another copy of the model's store, or a newer one): opened and checked
        here, swapped in where the model lives; an older generation of the store in use is refused."""
        with self.store_lock:
            cur = self.lm.store
            new = Datastore.open(path, fingerprint=self.lm.fingerprint, device=cur.device if cur is not None else "cpu")
            new.check_not_older(cur)
            if cur is not None:
                refused = removal_violations(new, read_exclusions(cur.path))
                if refused:
                    raise RpcFailure(Code.FAILED_PRECONDITION,
                                     f"path: the store holds content that removals recorded for the store in use "
                                     f"took out ({'; '.join(refused[:5])}); it would bring it back")
            prev = self.on_model(lambda: self.lm.swap_store(new))
            self._switched(prev, new, "swap")
        return prev, new

    def reload(self, reason: str = "reload") -> tuple[Datastore | None, Datastore] | None:
        """Serve the attached store's current generation on disk if it is newer: (previous, new), else None."""
        if self.lm.store is None:
            return None
        with self.store_lock:
            new = self.lm.newer_store()
            if new is None:
                return None
            prev = self.on_model(lambda: self.lm.swap_store(new))
            self._switched(prev, new, reason)
        return prev, new

    def _switched(self, prev: Datastore | None, new: Datastore, reason: str) -> None:
        if self.on_swap is not None:
            self.on_swap(prev, new, reason)
        if self.on_switch is not None:
            self.on_switch(new)
