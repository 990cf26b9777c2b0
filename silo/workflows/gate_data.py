"""What a gate fit reads besides the user's validation positions: the store's own distance unit, and
text the LM writes itself (silo.workflows.gate_fit explains why each)."""

from __future__ import annotations

import numpy as np

from silo.core.corpus import Document
from silo.datastore.store import Datastore
from silo.model.types import PositionBatch, SiloInputError

from .tuning import domain_texts

OWN_PASSAGE = 512  # tokens either side of a stored key that count as its own passage (store_distance_scale)
LM_SAMPLES = "lm-samples"  # the label of the positions of text the LM wrote itself


def store_distance_scale(store: Datastore, n: int = 2048, k: int = 64, seed: int = 0) -> float | None:
    """The store's own distance unit: the median squared distance from a sample of its stored keys to the
    nearest neighbour outside their own passage (another document, or the same one more than OWN_PASSAGE
    tokens away), searched through the store's own index. It is what text of the store's kind that the
    store does not hold gets, whatever validation a user has. None when no shard keeps its keys."""
    from silo.datastore.keys_store import has_keys, open_keys

    shards = [(si, s) for si, s in enumerate(store.shards) if len(s.entries) and has_keys(s.dir)]
    if not shards:
        return None
    rng = np.random.default_rng(seed)
    sizes = np.array([len(s.entries) for _, s in shards], dtype=np.float64)
    per = rng.multinomial(int(min(n, sizes.sum())), sizes / sizes.sum())
    queries, own = [], []
    for (si, s), m in zip(shards, per):
        rows = np.sort(rng.choice(len(s.entries), size=min(int(m), len(s.entries)), replace=False))
        queries.append(np.asarray(open_keys(s.dir)[rows], dtype=np.float32))
        e = s.entries[rows]
        own.append(np.stack([(np.int64(si) << 32) | e["doc"].astype(np.int64), e["pos"].astype(np.int64)], 1))
    nb = store.search(np.ascontiguousarray(np.concatenate(queries)), k)
    own = np.concatenate(own)
    pos = np.zeros(nb.ids.shape, np.int64)
    for si, s in enumerate(store.shards):
        m = (nb.shard == si) & (nb.tokens >= 0)
        pos[m] = s.entries["pos"][nb.ids[m]]
    same = (store.doc_keys(nb) == own[:, :1]) & (np.abs(pos - own[:, 1:]) < OWN_PASSAGE)
    d = np.where((nb.tokens >= 0) & ~same, nb.distances.astype(np.float64), np.inf).min(1)
    d = d[np.isfinite(d)]
    return float(np.median(d)) if len(d) >= 16 and np.median(d) > 0 else None


def validation_positions(lm, docs: list[Document], max_tokens: int) -> tuple[PositionBatch, list[str]]:
    """Every domain's first `max_tokens` scored positions, in one batch; and each position's domain."""
    parts, labels = [], []
    for dom, texts in domain_texts(docs, max_tokens).items():
        pos = lm.collect(texts).truncate(max_tokens)
        parts.append(pos)
        labels += [dom] * len(pos.targets)
    if not parts:
        raise SiloInputError("gate.val: no validation text (after decontamination)", "gate.val")
    return PositionBatch.concat(parts), labels


def lm_sample_texts(lm, docs: list[Document], tokens: int, length: int = 128) -> list[str]:
    """Text the LM writes itself (temperature 1, fixed seeds): continuations of the first words of the
    validation documents. Under it the mixture's best lambda is 0 (E_pLM[log p_mix - log p_LM] = -KL <= 0),
    so the fit learns from it where the store should stay out, whatever validation the user has."""
    from silo.model.sampling import SamplingParams

    n = -(-tokens // length) if tokens > 0 else 0
    starts = [" ".join(d.text.split()[:8]) for d in sorted(docs, key=lambda d: d.id)] or [""]
    return [lm.complete(starts[i % len(starts)], SamplingParams(max_new_tokens=length, temperature=1.0, seed=i),
                        None, attribute=False).text for i in range(n)]


