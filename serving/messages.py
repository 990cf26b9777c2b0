"""silo.v1 messages built from the engine's and the store's results (shared by the gRPC services)."""

from __future__ import annotations

import math
from typing import Iterable

from silo.datastore.store import Datastore

from silo.model.lm import SiloLM
from silo.model.types import TokenLogprob

from .engine import GenResult
from .gen import silo_pb2 as pb


def completion_message(res: GenResult, request_id: str) -> pb.CompleteResponse:
    msg = pb.CompleteResponse(text=res.text, finish_reason=res.finish_reason, mode=res.mode, request_id=request_id,
                              usage=pb.Usage(prompt_tokens=res.prompt_tokens, completion_tokens=res.completion_tokens))
    if res.store_generation is not None:
        msg.store_generation = res.store_generation
    for a in res.attributions if res.return_attributions else ():
        msg.attributions.append(pb.SentenceAttribution(
            sentence=a.sentence, start=a.start, end=a.end, parametric_share=a.parametric_share, tokens=a.tokens,
            other_share=a.other_share,
            sources=[pb.AttributionSource(owner=s.owner, document_id=s.document_id, title=s.title, license=s.license,
                                          shard=s.shard, sentence=s.sentence, share=s.share, source=s.source,
                                          url=s.url) for s in a.sources],
            spans=[pb.VerbatimSpan(**vars(x)) for x in a.spans],
            training=[pb.TrainingSpan(**vars(x)) for x in a.training]))
    msg.notices.extend(pb.LicenseNotice(**vars(n), text=n.text()) for n in res.notices)
    msg.guard_events.extend(pb.GuardEvent(**vars(e)) for e in res.guard_events)
    msg.logprobs.extend(logprob_messages(res.logprobs or ()))
    msg.prompt_logprobs.extend(logprob_messages(res.prompt_logprobs or ()))
    if res.prompt_text is not None:
        msg.prompt_text = res.prompt_text
    return msg


def logprob_messages(tokens: Iterable[TokenLogprob]) -> list[pb.TokenLogprob]:
    """silo.v1 TokenLogprob messages of tokens' log-probs (-inf as a large negative number)."""
    out = []
    for t in tokens:
        msg = pb.TokenLogprob(id=t.token, text=t.text, logprob_parametric=finite(t.logprob_parametric or 0.0),
                              lmbda=t.lmbda, offset=t.offset,
                              top=[pb.TopLogprob(id=i, text=x, logprob=finite(v)) for i, x, v in t.top])
        if t.logprob is not None:
            msg.logprob = finite(t.logprob)
        out.append(msg)
    return out


def store_message(store: Datastore | None, show_path: bool = True, show_shards: bool = True) -> pb.StoreInfo:
    """A store's facts; the folder and the shards (names, owners) only where the caller may see them."""
    if store is None:
        return pb.StoreInfo()
    s = store.summary()
    return pb.StoreInfo(path=s.path if show_path else "", generation=s.generation, fingerprint=s.fingerprint, index=s.index,
                        entries=s.entries, shard_count=len(s.shards),
                        shards=[pb.ShardInfo(name=x.name, owner=x.owner, entries=x.entries,
                                             documents=x.documents) for x in s.shards] if show_shards else [])


def knn_defaults(lm: SiloLM) -> pb.KnnDefaults:
    """What a kNN request without overrides gets: the store's gate, or the fixed settings."""
    return pb.KnnDefaults(**lm.served_knn())


def finite(x: float) -> float:
    return x if math.isfinite(x) else -1e30  # -inf log-probs (kNN mass 0 with lambda 1) as a large negative

