"""Reindex a store from its stored keys and report what the new index costs in quality.

`reindex_with_report` wraps `silo.datastore.reindex.reindex_store` (no LM pass for the index itself) with
two measurements:

* recall@k of the new index against exact search over the stored keys. Queries are the model's keys of
  validation text when `val` is given (what a served query looks like), otherwise a sample of stored keys
  (each finds itself first, so recall@1 is optimistic; recall@k for larger k still shows how well the
  index keeps neighbourhoods);
* with `val`: perplexity of the validation text per domain under the store's served mixture
  (`lm.retriever("knn")`: the fitted gate when the store has one) before and after, and parametric-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from silo.core.corpus import load_documents
from silo.datastore.format import Manifest
from silo.datastore.keys_store import open_keys, sample_keys
from silo.datastore.reindex import ReindexResult, index_recall, reindex_store
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM

from .tuning import domain_texts


def _perplexities(lm: SiloLM, texts: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    out = {}
    for dom, ts in texts.items():
        res = lm.score(ts, lm.retriever("knn"))
        logp = np.concatenate([r.logp for r in res])
        logp_par = np.concatenate([r.logp_parametric for r in res])
        out[dom] = {"tokens": int(len(logp)), "knn": float(math.exp(-logp.mean())),
                    "parametric": float(math.exp(-logp_par.mean()))}
    return out


@dataclass(frozen=True)
class ReindexReport:
    """A reindex (`ReindexResult`) and what it costs in quality: recall@k of the new index, and with
    validation text the served perplexity per domain before and after."""

    result: ReindexResult
    recall_queries: str  # what the recall queries were
    recall: dict[str, float]
    perplexity: dict[str, dict] | None = None  # {domain: {tokens, parametric, before, after, change_pct}}

    def to_json(self) -> dict:
        out = {**self.result.to_json(), "recall_queries": self.recall_queries, "recall": self.recall}
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        return out


def reindex_with_report(store: str | Path, factory: str, train_sample: int = 200_000, nprobe: int | None = None,
                        val: list[str] | None = None, model: str | None = None, k: int = 32,
                        max_tokens: int = 4000, queries: int = 512, progress: bool = True) -> ReindexReport:
    """Reindex `store` as `factory`; report recall and, with `val`, the perplexity change per domain."""
    store = Path(store)
    lm, texts, before = None, {}, {}
    if val:
        lm = SiloLM.load(model or Manifest.read(store).model.path, str(store))
        texts = domain_texts(load_documents(val), max_tokens)
        before = _perplexities(lm, texts)
    result = reindex_store(store, factory, train_sample, nprobe, progress=progress)
    new = Datastore.open(store, fingerprint=lm.fingerprint if lm else None)
    rng = np.random.default_rng(1)
    if lm is not None:
        keys = lm.collect([t for ts in texts.values() for t in ts]).keys
        q = keys[np.sort(rng.choice(len(keys), min(queries, len(keys)), replace=False))]
        recall_queries = f"{len(q)} keys of validation text"
    else:
        q = sample_keys([open_keys(s.dir, new.key_dim) for s in new.shards], queries, seed=1)
        recall_queries = f"{len(q)} stored keys"
    recall = index_recall(new, q, tuple(sorted({1, 10, k})), progress)
    if lm is None:
        return ReindexReport(result, recall_queries, recall)
    lm.swap_store(new)
    after = _perplexities(lm, texts)
    perplexity = {
        dom: {"tokens": b["tokens"], "parametric": round(b["parametric"], 3), "before": round(b["knn"], 3),
              "after": round(after[dom]["knn"], 3), "change_pct": round(100 * (after[dom]["knn"] / b["knn"] - 1), 2)}
        for dom, b in before.items()}
    return ReindexReport(result, recall_queries, recall, perplexity)
