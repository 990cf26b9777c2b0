"""A small Python client for silo.v1.

    with SiloClient("127.0.0.1:50051") as c:
        r = c.complete("To be, or not to be", max_tokens=32, seed=0, return_attributions=True)
        print(r.text, r.finish_reason, [a.sources for a in r.attributions])
        for piece in c.complete_stream("Once upon a time"):   # str deltas, then the final CompleteResponse
            ...

Methods return the proto messages (plain attribute access; `to_dict` turns one into a dict). Keyword
arguments of complete/chat are the fields of silo.v1.GenerationParams.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import grpc
from google.protobuf.json_format import MessageToDict

from .gen import silo_pb2 as pb
from .gen import silo_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from silo.datastore.removal_records import Receipt


def to_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True)


def params(**kw) -> pb.GenerationParams:
    """GenerationParams from keyword arguments; None values are left unset (server defaults)."""
    stop = kw.pop("stop", None)
    p = pb.GenerationParams(**{k: v for k, v in kw.items() if v is not None})
    if stop:
        p.stop.extend([stop] if isinstance(stop, str) else stop)
    return p


class SiloClient:
    def __init__(self, target: str, token: str | None = None, tls: bool | str = False,
                 timeout: float | None = 60.0):
        """`tls`: False (plaintext), True (system roots) or a path to a PEM CA certificate.
        `token`: a client token (serve.api_tokens), a data owner's token or the admin token, sent with every
        call: generation needs one when the server sets api_tokens, and what supporting text a response
        shows depends on who asks.
        `timeout`: default deadline per call."""
        if tls:
            roots = Path(tls).read_bytes() if isinstance(tls, str) else None
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=roots))
        else:
            self.channel = grpc.insecure_channel(target)
        self.token = token
        self.timeout = timeout
        self.gen = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)
        self._owner = pb_grpc.DataOwnerStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SiloClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _md(self):
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    # ------------------------------------------------------------------------------- generation
    def complete(self, prompt: str, timeout: float | None = None, **kw) -> pb.CompleteResponse:
        return self.gen.Complete(pb.CompleteRequest(prompt=prompt, params=params(**kw)),
                                 timeout=timeout or self.timeout, metadata=self._md())

    def complete_stream(self, prompt: str, timeout: float | None = None, **kw) -> Iterator[str | pb.CompleteResponse]:
        """Text deltas (str), then the final CompleteResponse. Breaking out of the loop cancels the call."""
        call = self.gen.CompleteStream(pb.CompleteRequest(prompt=prompt, params=params(**kw)),
                                       timeout=timeout or self.timeout, metadata=self._md())
        yield from _chunks(call)

    def chat(self, messages: Sequence[dict | tuple], timeout: float | None = None, **kw) -> pb.CompleteResponse:
        return self.gen.Chat(pb.ChatRequest(messages=_messages(messages), params=params(**kw)),
                             timeout=timeout or self.timeout, metadata=self._md())

    def chat_stream(self, messages: Sequence[dict | tuple], timeout: float | None = None,
                    **kw) -> Iterator[str | pb.CompleteResponse]:
        call = self.gen.ChatStream(pb.ChatRequest(messages=_messages(messages), params=params(**kw)),
                                   timeout=timeout or self.timeout, metadata=self._md())
        yield from _chunks(call)

    def score(self, text: str, mode: str = "", k: int | None = None, lmbda: float | None = None,
              tau: float | None = None) -> pb.ScoreResponse:
        req = pb.ScoreRequest(text=text, mode=mode, **{n: v for n, v in (("k", k), ("lmbda", lmbda), ("tau", tau))
                                                        if v is not None})
        return self.gen.Score(req, timeout=self.timeout, metadata=self._md())

    def tokenize(self, text: str) -> pb.TokenizeResponse:
        return self.gen.Tokenize(pb.TokenizeRequest(text=text), timeout=self.timeout, metadata=self._md())

    def info(self) -> pb.ModelInfoResponse:
        """Model and store facts; with the admin token also the server's paths."""
        return self.gen.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout, metadata=self._md())

    # ------------------------------------------------------------------------------- admin
    def list_shards(self) -> pb.StoreInfo:
        return self.admin.ListShards(pb.ListShardsRequest(), metadata=self._md(), timeout=self.timeout)

    def swap_datastore(self, path: str) -> pb.DatastoreChange:
        return self.admin.SwapDatastore(pb.SwapDatastoreRequest(path=str(path)), metadata=self._md(),
                                        timeout=self.timeout)

    def reload_datastore(self) -> pb.DatastoreChange:
        return self.admin.ReloadDatastore(pb.ReloadDatastoreRequest(), metadata=self._md(), timeout=self.timeout)


    # ---- data owners (token: the admin token or the owner's own token)
    def submit_removal(self, owner: str | None = None, document_ids: Sequence[str] = (), shards: Sequence[str] = (),
                       requester: str = "", reason: str = "", request_id: str = "", wait: bool = False,
                       skip_verification: bool = False, timeout: float | None = None) -> pb.RemovalStatus:
        req = pb.RemovalRequest(owner=owner or "", document_ids=list(document_ids), shards=list(shards),
                                requester=requester, reason=reason, request_id=request_id, wait=wait,
                                skip_verification=skip_verification)
        return self._owner.SubmitRemoval(req, timeout=timeout or self.timeout, metadata=self._md())

    def get_removal(self, request_id: str) -> pb.RemovalStatus:
        return self._owner.GetRemoval(pb.GetRemovalRequest(request_id=request_id), timeout=self.timeout,
                                      metadata=self._md())

    def get_receipt(self, request_id: str) -> Receipt:
        import json

        from silo.datastore.removal_records import Receipt  # the wire's JSON read into the typed record

        r = self._owner.GetReceipt(pb.GetRemovalRequest(request_id=request_id), timeout=self.timeout,
                                   metadata=self._md())
        return Receipt.from_json(json.loads(r.json))

    def list_removals(self, owner: str = "") -> list[pb.RemovalStatus]:
        return list(self._owner.ListRemovals(pb.ListRemovalsRequest(owner=owner), timeout=self.timeout,
                                             metadata=self._md()).removals)

    def get_ledger(self, owner: str = "") -> pb.LedgerResponse:
        """Contribution ledger totals: the token's own owner, or (admin token) every owner / `owner`."""
        return self._owner.GetLedger(pb.LedgerRequest(owner=owner), timeout=self.timeout, metadata=self._md())

    def lookup(self, document_id: str = "", text: str = "") -> pb.LookupResponse:
        return self._owner.Lookup(pb.LookupRequest(document_id=document_id, text=text), timeout=self.timeout,
                                  metadata=self._md())


def _chunks(call) -> Iterator[str | pb.CompleteResponse]:
    try:
        for chunk in call:
            if chunk.WhichOneof("event") == "delta":
                yield chunk.delta
            else:
                yield chunk.done
    finally:
        call.cancel()  # no-op when the stream ended; stops generation when the caller broke out early


def _messages(messages) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out
