"""Opt-out with verification: remove a data owner's content and show, with the LM, that it is gone.

One workflow, used by the CLI (`silo datastore remove`) and the server (`DataOwner.SubmitRemoval`):

1. `prepare`: open a snapshot of the store *before* the removal (kept in memory: the "before" numbers
   come from it even after the old files are deleted) and validate the request against it (nothing
   changes on a bad request);
2. `apply`: record and apply the request (`RemovalManager.submit`) and make the LM serve the new
   generation at once (`lm.reload_store()`; a server runs this between two requests);
3. `compact`: the removed text leaves every file; the LM switches to the compacted generation;
4. `verify`, on a bounded sample of the removed documents (by default at most 8 documents / prefixes,
   24-token continuations, so it takes seconds on a CPU):
   a. *retrieval probe*: keys computed by running the model over the removed text are searched in the
      new store; no neighbour may belong to a removed document (or, for an owner request, that owner);
      the same probe on the old snapshot shows the probe does find them when they are there;
   b. *verbatim continuation*: greedy kNN-LM continuations of prefixes of the removed text, compared
      with the true continuation (longest common token span, ROUGE-L F1 on tokens, exact-prefix length)
      before and after removal and parametric-only; after must fall to about the parametric level;
   c. *perplexity* of the removed text before, after and parametric-only (reported, not a criterion:
      it rises towards the parametric level);
   and write the results into the receipt (status ``verified``) and the journal.

`remove_and_verify(lm, request)` runs all four. The receipt never contains removed text: only ids,
counts, checksums and scores.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from silo.datastore.removal import RemovalManager
from silo.datastore.format import StoredDocument
from silo.datastore.removal_records import Receipt, RemovalRequest, RemovalState, RemovalTargets
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.model.sampling import SamplingParams
from silo.model.types import PositionBatch, SiloInputError

# A removal passes the verbatim check when its ROUGE-L after removal is within this of parametric-only.
VERBATIM_TOLERANCE = 0.1


@dataclass
class PendingRemoval:
    """A validated request and what verification needs later: the snapshot before the removal and the
    removed documents (in memory only; they are never written anywhere)."""

    request: RemovalRequest
    targets: RemovalTargets
    before: Datastore
    removed: list[StoredDocument]
    state: RemovalState | None = None

    @property
    def owner(self) -> str | None:
        return self.request.owner if self.request.kind == "owner" else None


class RemovalWorkflow:
    """remove -> live -> compact -> live -> verify -> receipt, for an LM serving a store.

    `on_model(fn)` runs `fn` where the model may be touched: the server passes its engine's control hook
    (between two requests); the CLI runs it in place. `store_lock` (a context manager) is held while the
    store's files change in `compact` (the server's lock, shared with its swaps and reloads). `on_switch`
    (optional) is told every store snapshot the LM switched to (a cluster rolls it out to its replicas);
    `replica_check(pending)` (optional) verifies the removal where else it is served: its result (with a
    `passed` flag) goes into the verification as `replicas`."""

    def __init__(self, lm: SiloLM, on_model: Callable[[Callable[[], Any]], Any] | None = None,
                 progress: bool = False, store_lock: AbstractContextManager | None = None,
                 on_switch: Callable[[Datastore], None] | None = None,
                 replica_check: Callable[[PendingRemoval], dict] | None = None):
        if lm.store is None:
            raise SiloInputError("lm has no datastore attached; load it with a store to remove from", "store")
        self.lm = lm
        self.on_model = on_model or (lambda fn: fn())
        self.store_lock = store_lock or nullcontext()
        self.on_switch = on_switch
        self.replica_check = replica_check
        self.manager = RemovalManager(lm.store.path)
        self._say = (lambda msg: print(f"optout: {msg}", file=sys.stderr, flush=True)) if progress else (lambda m: None)

    def prepare(self, request: RemovalRequest | dict, owner: str | None = None) -> PendingRemoval:
        """Validate `request` against the current generation (RemovalError naming the field; nothing
        changes). With `owner` (a data owner's token) only that owner's content may be named."""
        req = RemovalRequest.coerce(request)
        lm = self.lm
        before = Datastore.open(lm.store.path, fingerprint=lm.fingerprint, device=lm.store.device, reuse=lm.store)
        targets = self.manager.resolve(req, before.manifest, owner=owner)
        return PendingRemoval(req, targets, before, removed_documents(before, targets))

    def switch(self, *request_ids: str) -> None:
        """Make the LM serve the store's current generation: opened here, swapped where the model lives;
        where it is rolled out further (`on_switch`), the record goes with the requests that produced it."""
        new = self.lm.newer_store()
        if new is not None:
            self.on_model(lambda: self.lm.swap_store(new))
            if self.on_switch is not None:
                record = self.on_switch(new)
                for request_id in request_ids if record is not None else ():
                    self.manager.record_rollout(request_id, record)

    def apply(self, pending: PendingRemoval) -> RemovalState:
        """Record and apply the request (file work under the store's lock, not where the model runs); the
        LM serves the new generation when this returns."""
        req = pending.request
        self._say(f"{req.request_id}: removing {pending.targets.entries:,} entries "
                  f"({len(pending.removed)} document(s)) from generation {pending.before.generation}")
        t0 = time.time()
        pending.state = self.manager.submit(req, rollout_required=self.on_switch is not None)
        self.switch(req.request_id)
        pending.state = self.manager.status(req.request_id)
        self.apply_seconds = time.time() - t0
        self._say(f"{req.request_id}: applied in {self.apply_seconds:.2f}s (generation {self.lm.store.generation}); "
                  "compacting")
        return pending.state

    def compact(self, pending: PendingRemoval) -> Receipt:
        """Rewrite the affected shards without the removed text; the LM switches to that generation."""
        with self.store_lock:
            receipt = self.manager.compact(pending.request.request_id)
            self.switch(pending.request.request_id)
        self._say(f"{pending.request.request_id}: compacted (generation {self.lm.store.generation})")
        return receipt

    def verify(self, pending: PendingRemoval, **options) -> Receipt:
        """Check with the LM that the removed text is neither retrieved nor reproduced; returns the receipt."""
        t1 = time.time()
        verification = self.on_model(lambda: verify_removal(self.lm, pending.before, pending.removed,
                                                            owner=pending.owner, **options))
        if self.replica_check is not None:
            replicas = self.replica_check(pending)
            verification["replicas"] = replicas
            verification["passed"] = bool(verification["passed"] and replicas.get("passed"))
        verification["seconds"] = round(time.time() - t1, 2)
        if hasattr(self, "apply_seconds"):
            verification["apply_seconds"] = round(self.apply_seconds, 3)
        self._say(f"{pending.request.request_id}: verification {'passed' if verification['passed'] else 'FAILED'} "
                  f"({verification['seconds']}s)")
        return self.manager.record_verification(pending.request.request_id, verification)

    def finish(self, pending: PendingRemoval, verify: bool = True, **options) -> Receipt:
        """Compact and (unless `verify` is False) verify; a failure is recorded in the request's state (and
        raised), so a status query reports it even after a restart."""
        try:
            receipt = self.compact(pending)
            if verify:
                receipt = self.verify(pending, **options)
            self.manager.record_error(pending.request.request_id, None)
            return receipt
        except Exception as exc:
            self.manager.record_error(pending.request.request_id, f"{type(exc).__name__}: {exc}")
            raise


def remove_and_verify(lm: SiloLM, request: RemovalRequest | dict, progress: bool = True, verify: bool = True,
                      **options) -> Receipt:
    """Record, apply and compact `request` on the store attached to `lm`, switch `lm` to the new
    generation, verify with the LM (unless `verify=False`) and return the receipt. `options`:
    max_probes, prefix_tokens, continuation_tokens, probe_chars (see `verify_removal`).

    Raises `RemovalError` (a `DatastoreError`, with `.field`) for an invalid request, before any change.
    """
    wf = RemovalWorkflow(lm, progress=progress)
    pending = wf.prepare(request)
    wf.apply(pending)
    return wf.finish(pending, verify=verify, **options)


def removed_documents(store: Datastore, targets: RemovalTargets) -> list[StoredDocument]:
    """The documents a resolved request removes, from an open snapshot (text stays in memory only)."""
    whole = {x.name for x in targets.drop_shards}
    ids = {x.name: set(x.document_ids) for x in targets.drop_documents}
    out = []
    for shard in store.shards:
        for d in shard.live_documents():
            if shard.name in whole or d.id in ids.get(shard.name, ()):
                out.append(d)
    return out


def _sample(items: list, n: int) -> list:
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def verify_removal(lm: SiloLM, before: Datastore, removed: list[StoredDocument], owner: str | None = None,
                   max_probes: int = 8, prefix_tokens: int = 64, continuation_tokens: int = 24,
                   probe_chars: int = 2000) -> dict:
    """Compare `before` (a snapshot holding the removed documents) with `lm.store` (after removal) on a
    sample of `removed` documents. Returns a JSON-able dict with
    ``probe``, ``verbatim``, ``perplexity`` and ``passed``; it holds no text."""
    after = lm.store
    if after is None:
        raise SiloInputError("lm has no datastore attached")
    # the mixture the LM serves (its gate, when the store has one), searching at every position
    knn = {"before": lm.retriever("knn", store=before, skip="off"), "after": lm.retriever("knn", store=after, skip="off")}
    docs = _sample(removed, max_probes)
    removed_keys = {(d.owner, d.id) for d in removed}
    out = {"documents_probed": [d.id for d in docs], "documents_removed": len(removed),
           "knn": knn["after"].mixture.describe(),
           "generations": {"before": before.generation, "after": after.generation}}
    if not docs:
        out.update(probe=None, verbatim=None, perplexity=None, passed=True)
        return out

    # (a) + (c): one pass of the model over the removed text gives keys, targets and LM log-probs.
    pos: PositionBatch = lm.collect([d.text[:probe_chars] for d in docs])
    probe, ppl = {"queries": int(len(pos.targets)), "k": knn["after"].k}, {"tokens": int(len(pos.targets))}
    for name, r in knn.items():
        nb = r.search(pos.keys)
        probe[name] = _neighbour_hits(r.store, nb, removed_keys, owner)
        ppl[name] = _ppl(r.mix_targets(pos, nb))
    ppl["parametric"] = _ppl(pos.logp_lm)
    probe["passed"] = probe["after"]["hits"] == 0
    out["probe"], out["perplexity"] = probe, ppl

    # (b) verbatim continuation: greedy, kNN-LM before / after, and parametric only.
    bos = lm.tokenizer.eos_token_id
    P = max(1, min(prefix_tokens, lm.context_length - continuation_tokens - 2))
    C = continuation_tokens
    probes = _prefix_probes(lm, docs, max_probes, P, C)
    scores = {"before": [], "after": [], "parametric": []}
    greedy = SamplingParams(max_new_tokens=C, temperature=0.0)
    for prefix, truth in probes:
        ids = [bos] + prefix
        for name, retriever in (("before", knn["before"]), ("after", knn["after"]), ("parametric", None)):
            comp = lm.complete("", greedy, retriever, attribute=False, prompt_ids=ids)
            scores[name].append(_overlap(comp.tokens, truth))
    verbatim = {"probes": len(probes), "prefix_tokens": P, "continuation_tokens": C}
    for name, rows in scores.items():
        verbatim[name] = {m: round(float(np.mean([r[m] for r in rows])), 4) if rows else None
                          for m in ("lcs_span", "rouge_l", "exact_prefix")}
    if probes:
        verbatim["passed"] = verbatim["after"]["rouge_l"] <= verbatim["parametric"]["rouge_l"] + VERBATIM_TOLERANCE
        # Only meaningful if the store made the model reproduce the text before; with kNN settings that
        # do not (e.g. a tau far above the key distances) the check says nothing.
        verbatim["informative"] = verbatim["before"]["rouge_l"] > verbatim["parametric"]["rouge_l"] + VERBATIM_TOLERANCE
    else:
        verbatim["passed"], verbatim["informative"] = True, False
    verbatim["tolerance"] = VERBATIM_TOLERANCE
    out["verbatim"] = verbatim
    out["passed"] = bool(probe["passed"] and verbatim["passed"])
    infgram = infgram_probe(lm, after, docs, removed_keys, probe_chars)
    if infgram is not None:  # the store's inf-gram indexes: the removed text's n-grams must count 0 there
        out["infgram"] = infgram
        out["passed"] = bool(out["passed"] and infgram["passed"])
    return out


INFGRAM_PROBE_N = 12  # tokens per probed n-gram
INFGRAM_PROBES = 16  # n-grams per removed document


def infgram_probe(lm: SiloLM, after: Datastore, docs: list[StoredDocument], removed_keys: set,
                  probe_chars: int = 2000) -> dict | None:
    """n-grams cut from the removed documents, counted in `after`'s inf-gram indexes: none may occur in a
    removed document (occurrences in kept documents are counted apart: other owners may share a phrase).
    None when the store has no inf-gram index."""
    from silo.datastore.format import DatastoreError
    from silo.datastore.infgram import StoreNgrams, has_infgram

    if not any(has_infgram(s.dir) for s in after.shards):
        return None
    try:
        ngrams = StoreNgrams(after)
    except DatastoreError as exc:
        return {"passed": False, "error": str(exc)}
    n, owner_hits, elsewhere, probed = INFGRAM_PROBE_N, 0, 0, 0
    for d in docs:
        ids = lm.encode(d.text[:probe_chars])
        for at in range(0, max(0, len(ids) - n), max(1, (len(ids) - n) // INFGRAM_PROBES))[:INFGRAM_PROBES]:
            probed += 1
            for s, doc in ngrams.document_hits(ids[at:at + n]):
                sd = after.document(s, doc)
                if (sd.owner, sd.id) in removed_keys:
                    owner_hits += 1
                else:
                    elsewhere += 1
    return {"ngrams": probed, "n": n, "removed_hits": owner_hits, "kept_hits": elsewhere,
            "passed": owner_hits == 0}


def probe_served_store(lm: SiloLM, removed: list[StoredDocument], owner: str | None = None, max_probes: int = 8,
                       probe_chars: int = 2000) -> dict:
    """The retrieval probe of `verify_removal` on the snapshot `lm` serves now (a cluster asks this of every
    replica): keys from a sample of the removed documents' text, searched in the store; `hits` counts
    neighbours from removed documents (or, for an owner request, the owner)."""
    docs = _sample(removed, max_probes)
    store = lm.store
    if store is None or not docs:
        return {"generation": store.generation if store is not None else None, "hits": 0, "queries": 0}
    knn = lm.retriever("knn", skip="off")
    pos: PositionBatch = lm.collect([d.text[:probe_chars] for d in docs])
    hits = _neighbour_hits(store, knn.search(pos.keys), {(d.owner, d.id) for d in removed}, owner)
    return {"generation": store.generation, "queries": int(len(pos.targets)), **hits}


def _prefix_probes(lm: SiloLM, docs: list[StoredDocument], n: int, P: int, C: int) -> list[tuple[list[int], list[int]]]:
    """Up to n (prefix, true continuation) token pairs spread over the documents and within each."""
    toks = [lm.encode(d.text[:20000]) for d in docs]
    usable = [t for t in toks if len(t) >= P + C]
    if not usable:
        return []
    per = -(-n // len(usable))  # probes per document
    out = []
    for j in range(n):
        t, k = usable[j % len(usable)], j // len(usable)  # the k-th of `per` probes on this document
        start = int((len(t) - P - C) * (k + 0.5) / per)
        out.append((t[start:start + P], t[start + P:start + P + C]))
    return out


def _neighbour_hits(store: Datastore, nb, removed_keys: set, owner: str | None) -> dict:
    """How many retrieved neighbours belong to removed documents (or, for an owner request, the owner)."""
    hit = np.zeros(nb.ids.shape, dtype=bool)
    for si, shard in enumerate(store.shards):
        bad = np.array([(d.owner, d.id) in removed_keys or (owner is not None and d.owner == owner)
                        for d in shard.documents], dtype=bool)
        if not bad.any():
            continue
        m = (nb.shard == si) & (nb.tokens >= 0)
        if m.any():
            hit[m] = bad[shard.entries["doc"][nb.ids[m]]]
    return {"hits": int(hit.sum()), "neighbours": int((nb.tokens >= 0).sum()),
            "queries_with_hit": int(hit.any(axis=1).sum()),
            "top1_hit_rate": round(float(hit[:, 0].mean()), 4) if hit.shape[1] else 0.0}


def _ppl(logp: np.ndarray) -> float | None:
    return round(float(math.exp(-np.mean(logp))), 4) if len(logp) else None


def _overlap(gen: list[int], truth: list[int]) -> dict:
    """Longest common contiguous token span, ROUGE-L F1 (token LCS) and exact-prefix length."""
    n, m = len(gen), len(truth)
    span = 0
    sub = [[0] * (m + 1) for _ in range(n + 1)]
    seq = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if gen[i - 1] == truth[j - 1]:
                sub[i][j] = sub[i - 1][j - 1] + 1
                span = max(span, sub[i][j])
                seq[i][j] = seq[i - 1][j - 1] + 1
            else:
                seq[i][j] = max(seq[i - 1][j], seq[i][j - 1])
    lcs = seq[n][m]
    rouge = 0.0 if lcs == 0 else 2 * (lcs / n) * (lcs / m) / ((lcs / n) + (lcs / m))
    prefix = 0
    for a, b in zip(gen, truth):
        if a != b:
            break
        prefix += 1
    return {"lcs_span": span, "rouge_l": rouge, "exact_prefix": prefix}
