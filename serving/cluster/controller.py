"""The store controller: the only writer of a cluster's store, a named Ray actor.

Every change to the store goes through it — removals, swaps, reloads, and the contribution ledger — so
the store has one writer however many replicas serve it. A change is published on disk first (a new
manifest generation; replicas open the store read-only), then rolled out: the controller asks every live
replica to serve the new generation (a Ray Serve broadcast) and waits until each has acknowledged it,
asking again for replicas that joined meanwhile. A replica that has not acknowledged within
`cluster.rollout_timeout_s` is taken out of rotation (its actor is killed; Ray Serve starts a replacement,
which opens the current generation before it takes traffic). Only then does the change count as done: a
removal's status reaches `applied` (and later `compacted`) when its rollout is complete, and its receipt
lists every replica with its acknowledgement. Verification runs on the controller's own model copy over
the same files, and a retrieval probe runs on every replica's served snapshot.

The store lock on disk (`.removal.lock`, flock) still keeps other writers (a CLI build or compaction)
apart from the controller; on a network filesystem flock is only as good as the filesystem's lock
support (NFSv4 implements it; some FUSE filesystems do not), which is why the controller is the one
writer by design rather than by lock.
"""

from __future__ import annotations

import logging
import threading
import time

import ray

from silo.model.lm import SiloLM

from ..config import ServeConfig
from ..ledger import Ledger
from ..writer import LocalWriter
from .config import ClusterConfig

log = logging.getLogger("silo.serving.cluster")
REPLICA_DEPLOYMENT = "SiloReplica"


def replica_actor_names(app: str) -> dict[str, str]:
    """replica id -> Ray actor name of the live (or starting) replicas of `app`."""
    prefix = f"SERVE_REPLICA::{app}#{REPLICA_DEPLOYMENT}#"
    return {a["name"].rsplit("#", 1)[1]: a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == "serve" and a["name"].startswith(prefix)}


class StoreController:
    """See the module docstring. Runs as a threaded Ray actor (status questions are answered while a
    rollout waits for acknowledgements)."""

    def __init__(self, serve_cfg: dict, cluster_cfg: dict):
        self.cfg = ServeConfig.model_validate(serve_cfg)
        self.cluster = ClusterConfig.model_validate(cluster_cfg)
        self.lm = SiloLM.load(self.cfg.model, self.cfg.store, knn=self.cfg.resolved_knn(), device="cpu")
        self.lock = threading.Lock()
        self.ledger = Ledger(self.cfg.ledger) if self.cfg.ledger else None
        self.rollouts: list[dict] = []
        self.deployed = False  # before the replicas exist, a new generation needs no rollout
        self.writer = LocalWriter(self.lm, on_model=lambda fn: fn(), store_lock=self.lock, ledger=self.ledger,
                                  on_switch=self.rollout, replica_check=self.probe_replicas)
        self.resumed = self.writer.resume_unfinished()
        if self.ledger is not None and self.lm.store is not None:
            from ..dataowner import removed_owners

            for owner, request_id in removed_owners(self.lm.store.path):
                self.ledger.mark_removed(owner, request_id)

    # ------------------------------------------------------------------------------ state
    def ready(self) -> dict:
        store = self.lm.store
        return {"store": str(store.path) if store is not None else None,
                "generation": store.generation if store is not None else None, "resumed": self.resumed}

    def set_deployed(self, deployed: bool = True) -> None:
        self.deployed = deployed

    def generation(self) -> tuple[str | None, int | None]:
        store = self.lm.store
        return (str(store.path), store.generation) if store is not None else (None, None)

    def rollout_history(self, last: int = 20) -> list[dict]:
        return self.rollouts[-last:]

    # ------------------------------------------------------------------------------ writes
    def submit_removal(self, caller, request, verify: bool = True, wait: bool = False):
        """A removal, applied and rolled out to every replica before this returns (status `applied`)."""
        return self.writer.submit_removal(caller, request, verify=verify, wait=wait)

    def swap(self, path: str) -> tuple[str, int]:
        _, new = self.writer.swap(path)
        return str(new.path), new.generation

    def reload(self) -> tuple[str, int] | None:
        change = self.writer.reload()
        return None if change is None else (str(change[1].path), change[1].generation)

    def wait_background(self, timeout: float | None = None) -> None:
        self.writer.wait_background(timeout)

    def finishing(self, request_id: str) -> bool:
        return self.writer.finishing(request_id)

    # ------------------------------------------------------------------------------ ledger
    def record_credit(self, request_id: str, credits: dict, completion_tokens: int, mode: str,
                      store_generation: int | None) -> None:
        if self.ledger is not None:
            self.ledger.record(request_id, credits, completion_tokens, mode, store_generation)

    def ledger_totals(self, owner: str | None = None) -> list:
        return self.ledger.totals(owner) if self.ledger is not None else None

    def ledger_responses(self) -> int:
        return self.ledger.responses() if self.ledger is not None else 0

    def has_ledger(self) -> bool:
        return self.ledger is not None

    # ------------------------------------------------------------------------------ rollout
    def rollout(self, store) -> dict | None:
        """Have every live replica serve `store`'s generation (see the module docstring); the record of
        who acknowledged what, and who left rotation, is kept and returned."""
        want, path = store.generation, str(store.path)
        record = {"generation": want, "started": time.time(), "acks": {}, "left_rotation": {}}
        if not self.deployed:  # no replica serves yet: each opens this generation (or a newer one) when it starts
            record.update(seconds=0.0, note="no replica was running; every replica starts on this generation")
            self.rollouts.append(record)
            return record
        from ray import serve

        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=self.cluster.app)
        deadline = time.monotonic() + self.cluster.rollout_timeout_s
        while True:
            left = max(1.0, deadline - time.monotonic())
            try:
                answers = handle.broadcast("serve_generation", path, want).results(timeout_s=left,
                                                                                   return_exceptions=True)
            except TimeoutError:
                answers = []
            for a in answers:
                if isinstance(a, dict) and a.get("generation", -1) >= want:
                    record["acks"][a["replica"]] = a
            missing = {rid: name for rid, name in replica_actor_names(self.cluster.app).items()
                       if rid not in record["acks"]}
            if not missing:
                break
            if time.monotonic() >= deadline:
                for rid, name in missing.items():  # out of rotation: Ray Serve replaces it with a fresh one
                    try:
                        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                    except ValueError:
                        pass  # it died by itself meanwhile
                    record["left_rotation"][rid] = (f"no acknowledgement of generation {want} within "
                                                    f"{self.cluster.rollout_timeout_s:.0f}s")
                break
            time.sleep(0.2)
        record["seconds"] = round(time.time() - record["started"], 3)
        self.rollouts.append(record)
        log.info("rolled out", extra={"fields": {"event": "rollout", "generation": want,
                                                  "replicas": sorted(record["acks"]),
                                                  "left_rotation": sorted(record["left_rotation"])}})
        return record

    def probe_replicas(self, pending) -> dict:
        """The retrieval probe of a removal on every replica's served snapshot: no neighbour from what was
        removed. Part of the removal's verification (RemovalWorkflow.replica_check)."""
        from ray import serve

        if not self.deployed:
            return {"passed": True, "replicas": {}}
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=self.cluster.app)
        answers = handle.broadcast("probe_removed", pending.removed, pending.owner).results(
            timeout_s=self.cluster.rollout_timeout_s, return_exceptions=True)
        replicas = {a["replica"]: a for a in answers if isinstance(a, dict)}
        errors = [repr(a) for a in answers if not isinstance(a, dict)]
        return {"replicas": replicas, "errors": errors,
                "passed": bool(replicas) and not errors and all(a["hits"] == 0 for a in replicas.values())}
