"""Attribution: which datastore sources carried each sentence of a generated text.

kNN-LM: a token's probability p(y) = (1-lambda) p_LM(y) + sum_i lambda w_i [v_i == y] splits into the
parametric part and one part per neighbour. A sentence's share for a source is the mean, over the
sentence's tokens, of the fraction of p(y) that source's neighbours carried; the parametric share is the
same mean for the LM term, so a sentence's shares sum to 1; the sources below the listing cut are
reported together as `other_share`.

RIC-LM: every sentence is credited to the prepended blocks' documents, split by retrieval rank.

Each sentence also carries its verbatim evidence: the exact spans (at least `span_min_chars` long) it
shares with its sources' documents, with character offsets in the completion and in the document text.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from silo.core.text import sentence_of_offsets, sentence_spans
from silo.datastore.store import Datastore

from .types import GenerationStep, SentenceAttribution, Source, Span
from .verbatim import matching_spans

SPAN_MIN_CHARS = 20  # shortest verbatim span reported (OutputPolicy.span_min_chars)


def _source(store: Datastore, shard: int, doc: int, sentence: str, share: float) -> Source:
    d = store.document(shard, doc)
    return Source(owner=d.owner, document_id=d.id, title=d.title, license=d.license,
                  shard=store.shards[shard].name, sentence=sentence, share=share, source=d.source, url=d.url)


def spans_of(text: str, a: int, b: int, store: Datastore, docs: Sequence[tuple[int, int]],
             min_chars: int | None = None) -> list[Span]:
    """Verbatim spans of text[a:b] in each of `docs` ((shard, document) of `store`), in text order."""
    out = []
    for shard, doc in docs:
        d = store.document(shard, doc)
        for s, e, ds in matching_spans(text, a, b, d.text, min_chars or SPAN_MIN_CHARS):
            out.append(Span(document_id=d.id, owner=d.owner, shard=store.shards[shard].name, start=s, end=e,
                            doc_start=ds, doc_end=ds + e - s))
    return sorted(out, key=lambda x: (x.start, -x.end))


def tokens_per_sentence(text: str, steps: Sequence[GenerationStep], spans: list[tuple[int, int]]) -> list[int]:
    """How many generated tokens start in each sentence span."""
    starts = [min(st.offset, len(text)) for st in steps if st.token >= 0]
    counts = [0] * len(spans)
    for si, off in zip(sentence_of_offsets(spans, starts), starts):
        if spans and off < spans[si][1]:
            counts[si] += 1
    return counts


def _by_document(store: Datastore | None, shards: list, entries: list, shares: list):
    """The documents of voting neighbours, most credited first (ties: first seen first): ((shard, document),
    summed share, the sentence index of each of its neighbours, their shares). Sums run in token order."""
    if not shards:
        return
    sh = np.concatenate(shards).astype(np.int64)
    en = np.concatenate(entries).astype(np.int64)
    sc = np.concatenate(shares).astype(np.float64)
    doc = np.empty(len(sh), np.int64)
    sent = np.empty(len(sh), np.int64)
    for si in np.unique(sh):  # one lookup per shard, not one per neighbour
        m = sh == si
        e = np.asarray(store.shards[int(si)].entries)[en[m]]
        doc[m], sent[m] = e["doc"], e["sent"]
    keys, first, inv = np.unique((sh << 32) | doc, return_index=True, return_inverse=True)
    mass = np.zeros(len(keys))
    np.add.at(mass, inv, sc)  # in order, as a running sum per document
    seen = sorted(range(len(keys)), key=lambda j: first[j])
    for j in sorted(seen, key=lambda j: -mass[j]):  # (a generator: callers read only the first few)
        m = inv == j
        yield (int(keys[j] >> 32), int(keys[j] & 0xFFFFFFFF)), float(mass[j]), sent[m], sc[m]


def _first_largest(sent: np.ndarray, share: np.ndarray) -> int:
    """The sentence with the largest summed share (ties: the one seen first)."""
    ids, first, inv = np.unique(sent, return_index=True, return_inverse=True)
    total = np.zeros(len(ids))
    np.add.at(total, inv, share)
    seen = np.argsort(first, kind="stable")
    return int(ids[seen[int(np.argmax(total[seen]))]])


def attribute_steps(text: str, steps: Sequence[GenerationStep], store: Datastore | None, max_sources: int = 5,
                    min_share: float = 0.01, span_min_chars: int | None = None) -> list[SentenceAttribution]:
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
        shards, entries, shares = [], [], []  # every voting neighbour of the sentence's tokens, in token order
        for i in idx:
            sup = toks[i].support
            if sup.p <= 0:
                continue
            param += (1 - sup.lmbda) * sup.p_parametric / sup.p
            if sup.voters is not None and store is not None and len(sup.voters[0]):
                sh, en, w = sup.voters
                shards.append(sh)
                entries.append(en)
                shares.append(sup.lmbda * w / sup.p)
        n = len(idx)
        sources, keys = [], []
        listed = 0.0
        for (shard, doc), mass, sent, share in _by_document(store, shards, entries, shares):
            if mass / n < min_share or len(sources) >= max_sources:
                break
            d = store.document(shard, doc)
            sources.append(_source(store, shard, doc, d.sentence(_first_largest(sent, share)), mass / n))
            keys.append((shard, doc))
            listed += mass
        other = max(0.0, 1.0 - param / n - listed / n)
        spans_ = spans_of(text, a, b, store, keys, span_min_chars) if keys else []
        out.append(SentenceAttribution(text[a:b], a, b, param / n, sources, other_share=other if other > 1e-9 else 0.0,
                                       spans=spans_, tokens=n))
    return out


def rank_shares(n: int) -> list[float]:
    """Shares of n blocks by retrieval rank (1/r, normalised): the best block carries the most."""
    w = [1.0 / (r + 1) for r in range(n)]
    s = sum(w)
    return [x / s for x in w]


def attribute_blocks(text: str, blocks: Sequence, steps: Sequence[GenerationStep] = (), store: Datastore | None = None,
                     span_min_chars: int | None = None) -> list[SentenceAttribution]:
    """Every sentence of a RIC completion is credited to the prepended blocks' documents
    (`blocks`: [(BlockHit, share)]); with `store` (the blocks' snapshot) each sentence gets its verbatim
    spans in those documents, with `steps` its token count."""
    by_doc: dict[tuple[int, int], list] = {}
    for h, share in blocks:
        key = (h.shard, h.doc)
        if key in by_doc:
            by_doc[key][1] += share
        else:
            by_doc[key] = [h, share]
    ranked = sorted(by_doc.values(), key=lambda x: -x[1])
    spans = sentence_spans(text)
    counts = tokens_per_sentence(text, steps, spans)
    out = []
    for (a, b), n in zip(spans, counts):
        sources = [Source(owner=h.owner, document_id=h.document_id, title=h.title, license=h.license,
                          shard=h.shard_name, sentence=h.text, share=share) for h, share in ranked]
        if store is not None:
            for src, (h, _) in zip(sources, ranked):
                d = store.document(h.shard, h.doc)
                src.source, src.url = d.source, d.url
        found = spans_of(text, a, b, store, [(h.shard, h.doc) for h, _ in ranked], span_min_chars) if store else []
        out.append(SentenceAttribution(text[a:b], a, b, 0.0 if sources else 1.0, sources, spans=found, tokens=n))
    return out
