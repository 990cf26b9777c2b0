"""Attribution: which datastore sources carried each sentence of a generated text.

kNN-LM: a token's probability p(y) = (1-lambda) p_LM(y) + sum_i lambda w_i [v_i == y] splits into the
parametric part and one part per neighbour. A sentence's share for a source is the mean, over the
sentence's tokens, of the fraction of p(y) that source's neighbours carried; the parametric share is the
same mean for the LM term, so a sentence's shares sum to 1; the sources below the listing cut are
reported together as `other_share`.

RIC-LM: every sentence is credited to the prepended blocks' documents, split by retrieval rank.
"""

from __future__ import annotations

from typing import Sequence

from silo.core.text import sentence_of_offsets, sentence_spans
from silo.datastore.store import Datastore

from .types import GenerationStep, SentenceAttribution, Source


def attribute_steps(text: str, steps: Sequence[GenerationStep], store: Datastore | None, max_sources: int = 5,
                    min_share: float = 0.01) -> list[SentenceAttribution]:
    """Split generated text into sentences and rank the sources behind each one (see module docstring).
    `store` must be the snapshot the steps' neighbours came from."""
    toks = [st for st in steps if st.token >= 0]
    starts = [st.offset for st in toks]  # where each token starts in the text (recorded by generate)
    spans = sentence_spans(text)
    if not spans:
        return []
    sent_of = sentence_of_offsets(spans, [min(s, len(text)) for s in starts])
    out = []
    for si, (a, b) in enumerate(spans):
        idx = [i for i, s in enumerate(sent_of) if s == si and starts[i] < b]
        if not idx:
            out.append(SentenceAttribution(text[a:b], a, b, 1.0, []))
            continue
        param = 0.0
        by_doc: dict[tuple[int, int], float] = {}
        by_sent: dict[tuple[int, int], dict[int, float]] = {}
        for i in idx:
            sup = toks[i].support
            if sup.p <= 0:
                continue
            param += (1 - sup.lmbda) * sup.p_parametric / sup.p
            for shard, entry, w in sup.neighbors:
                if store is None:
                    continue
                e = store.shards[shard].entries[entry]
                key = (shard, int(e["doc"]))
                share = sup.lmbda * w / sup.p
                by_doc[key] = by_doc.get(key, 0.0) + share
                by_sent.setdefault(key, {})
                by_sent[key][int(e["sent"])] = by_sent[key].get(int(e["sent"]), 0.0) + share
        n = len(idx)
        sources = []
        listed = 0.0
        for (shard, doc), mass in sorted(by_doc.items(), key=lambda kv: -kv[1]):
            if mass / n < min_share or len(sources) >= max_sources:
                break
            d = store.document(shard, doc)
            best = max(by_sent[(shard, doc)].items(), key=lambda kv: kv[1])[0]
            sa, sb = d["sentences"][best] if d["sentences"] else (0, 0)
            sources.append(Source(owner=d["owner"], document_id=d["id"], title=d.get("title", ""),
                                  license=d.get("license", ""), shard=store.shards[shard].name,
                                  sentence=d["text"][sa:sb], share=mass / n))
            listed += mass
        other = max(0.0, 1.0 - param / n - listed / n)
        out.append(SentenceAttribution(text[a:b], a, b, param / n, sources, other if other > 1e-9 else 0.0))
    return out


def rank_shares(n: int) -> list[float]:
    """Shares of n blocks by retrieval rank (1/r, normalised): the best block carries the most."""
    w = [1.0 / (r + 1) for r in range(n)]
    s = sum(w)
    return [x / s for x in w]


def attribute_blocks(text: str, blocks: Sequence) -> list[SentenceAttribution]:
    """Every sentence of a RIC completion is credited to the prepended blocks' documents
    (`blocks`: [(BlockHit, share)])."""
    by_doc: dict[tuple[int, int], list] = {}
    for h, share in blocks:
        key = (h.shard, h.doc)
        if key in by_doc:
            by_doc[key][1] += share
        else:
            by_doc[key] = [h, share]
    ranked = sorted(by_doc.values(), key=lambda x: -x[1])
    out = []
    for a, b in sentence_spans(text):
        sources = [Source(owner=h.owner, document_id=h.document_id, title=h.title, license=h.license,
                          shard=h.shard_name, sentence=h.text, share=share) for h, share in ranked]
        out.append(SentenceAttribution(text[a:b], a, b, 0.0 if sources else 1.0, sources))
    return out
