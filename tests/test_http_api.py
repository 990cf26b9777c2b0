"""The HTTP door's OpenAI-compatible API on a real server (gRPC and uvicorn in one process, one engine),
driven by the official `openai` client; and the data owners' JSON routes with their roles."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

openai = pytest.importorskip("openai", reason="the HTTP API tests drive the server with the official openai client")

ADMIN = "admin-token-0123456789abcdef"
GCIDE = "gcide-secret-0123456789abcdef"
SHKSPR = "shakespeare-secret"
PROMPT = "In the beginning"
LONG = {"max_tokens": 110, "temperature": 1.0, "seed": 0, "extra_body": {"k": 2048, "lmbda": 0.5}}


@pytest.fixture(scope="module")
def served(tiny_model, tiny_store):
    # max_batch 1, max_queue 1: one request generating, one waiting, the next refused (backpressure)
    cfg = ServeConfig(model=str(tiny_model), store=str(tiny_store), port=0, http_port=0, admin_token=ADMIN,
                      max_queue=1, max_batch=1, max_tokens_limit=120,
                      owner_tokens={"gcide": "sha256:" + hashlib.sha256(GCIDE.encode()).hexdigest(),
                                    "shksprdata": SHKSPR})
    server = SiloServer(cfg, lm=SiloLM.load(str(tiny_model), str(tiny_store))).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oa(served):
    return openai.OpenAI(base_url=served.http.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def http(server, method, path, body=None, token=None):
    req = urllib.request.Request(server.http.url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_health_and_models(served, oa):
    assert http(served, "GET", "/health") == (200, {"status": "serving", "fingerprint": served.engine.lm.fingerprint,
                                                    "queue_depth": 0, "store_generation": 1})
    models = oa.models.list().data
    assert [m.id for m in models] == ["model"]  # the model folder's name
    assert models[0].model_extra["silo"]["store_generation"] == 1


def test_completion_matches_grpc_and_carries_silo_extension(served, oa):
    raw = oa.completions.with_raw_response.create(model="model", prompt=PROMPT, max_tokens=24, temperature=0,
                                                  extra_body={"lmbda": 0.8})
    r = raw.parse()
    choice = r.choices[0]
    # every response names the store generation it was served from; a generation's is the one it was admitted on
    assert raw.headers["x-silo-store-generation"] == "1" == str(choice.model_extra["silo"]["store_generation"])
    for path in ("/health", "/v1/models", "/owner"):
        with urllib.request.urlopen(served.http.url + path, timeout=60) as page:
            assert page.headers["x-silo-store-generation"] == "1", path
    assert choice.text and choice.finish_reason in ("length", "stop") and r.usage.completion_tokens > 0
    ext = choice.model_extra["silo"]
    assert ext["mode"] == "knn" and ext["store_generation"] == 1 and ext["attributions"]
    sources = [s for a in ext["attributions"] for s in a["sources"]]
    assert sources and all(s["owner"] and s["document_id"] and s["license"] for s in sources)
    assert all({"spans", "other_share", "tokens", "parametric_share"} <= set(a) for a in ext["attributions"])
    assert isinstance(ext["notices"], list) and isinstance(ext["guard_events"], list)
    with SiloClient(served.target, timeout=60) as c:  # the same engine behind both doors
        assert c.complete(PROMPT, max_tokens=24, temperature=0, lmbda=0.8).text == choice.text


def test_streaming_completion_arrives_in_pieces(served, oa):
    kw = {**LONG, "seed": 3}  # about a second of generation
    t0, stamps, pieces, last = time.monotonic(), [], [], None
    for chunk in oa.completions.create(model="model", prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            stamps.append(time.monotonic())
            pieces.append(chunk.choices[0].text)
            if chunk.choices[0].finish_reason:
                last = chunk
        else:
            usage = chunk.usage
    total = stamps[-1] - t0
    # events arrive as tokens are made: the first long before the last, not all at once at the end
    assert len(pieces) > 20 and stamps[0] - t0 < 0.5 * total, (stamps[0] - t0, total)
    assert last is not None and "silo" in last.choices[0].model_extra
    unary = oa.completions.create(model="model", prompt=PROMPT, **kw)
    assert "".join(pieces) == unary.choices[0].text and usage.completion_tokens == unary.usage.completion_tokens


def test_chat_unary_and_stream(served, oa):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made the heaven?"}]
    r = oa.chat.completions.create(model="model", messages=msgs, max_tokens=12, seed=1)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.prompt_tokens > 8 and "silo" in r.choices[0].model_extra
    deltas = [c.choices[0].delta for c in oa.chat.completions.create(model="model", messages=msgs, max_tokens=12,
                                                                     seed=1, stream=True)]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == r.choices[0].message.content


def test_bad_requests_name_the_field(served, oa):
    with pytest.raises(openai.BadRequestError) as ei:
        oa.completions.create(model="model", prompt=PROMPT, max_tokens=100000)
    err = ei.value.body
    assert ei.value.status_code == 400 and err["param"] == "max_tokens" and "max_tokens" in err["message"]
    assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as ei:
        oa.completions.create(model="model", prompt=PROMPT, temperature="hot")
    assert ei.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as ei:
        oa.chat.completions.create(model="model", messages=[{"role": "robot", "content": "hi"}])
    assert ei.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as ei:
        oa.completions.create(model="model", prompt=PROMPT, extra_body={"mode": "psychic"})
    assert ei.value.body["param"] == "mode"
    with pytest.raises(openai.NotFoundError) as ei:
        oa.completions.create(model="gpt-9", prompt=PROMPT)
    assert ei.value.body["param"] == "model" and ei.value.body["code"] == "model_not_found"
    assert http(served, "POST", "/v1/completions", None)[0] == 400
    status, err = http(served, "POST", "/v1/completions", {"model": "model", "prompt": "x" * 300_000})
    assert status == 413 and "larger than" in err["error"]["message"]  # refused before it is read in full
    with pytest.raises(openai.BadRequestError) as ei:  # within the byte limit, over serve.max_prompt_chars
        oa.completions.create(model="model", prompt="x" * 40_000)
    assert ei.value.body["param"] == "prompt"


def test_backpressure_is_429(served, oa):
    first = oa.completions.create(model="model", prompt=PROMPT, stream=True, **LONG)
    next(iter(first))  # running on the worker now
    queued = threading.Thread(target=lambda: oa.completions.create(model="model", prompt=PROMPT, max_tokens=4))
    queued.start()
    deadline = time.monotonic() + 10
    while served.engine.queue_depth < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(openai.RateLimitError) as ei:
        oa.completions.create(model="model", prompt=PROMPT, max_tokens=4)
    assert ei.value.status_code == 429 and "queue full" in ei.value.body["message"]
    first.close()  # the client goes away: its generation is cancelled, the queued one runs
    queued.join(30)
    assert not queued.is_alive()
    rec = served.engine.wait_record(lambda r: r.kind == "generate" and r.finish_reason == "cancelled")
    assert 1 <= rec.completion_tokens < LONG["max_tokens"]


def test_unary_client_that_gives_up_cancels_its_generation(served, oa):
    before = list(served.engine.records)
    impatient = oa.with_options(timeout=0.3, max_retries=0)  # one request, one generation
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model="model", prompt=PROMPT, **{**LONG, "seed": 5})
    rec = served.engine.wait_record(lambda r: r.kind == "generate" and r.finish_reason == "cancelled"
                                    and r.completion_tokens < LONG["max_tokens"], seen=before)
    assert rec.completion_tokens >= 1


def test_owner_routes_follow_the_grpc_roles(served):
    gdoc = json.loads((served.engine.lm.store.path / "shards" / "gcide" / "documents.jsonl")
                      .read_text().splitlines()[0])
    passage = {"text": gdoc["text"][200:400]}
    status, public = http(served, "POST", "/v1/owner/lookup", passage)
    assert status == 200 and public["in_store"] and public["matched_sentences"] > 0
    assert public["matches"] == [] and public["shards"] == []  # the public learns whether, not where or whose
    status, mine = http(served, "POST", "/v1/owner/lookup", passage, token=GCIDE)
    assert mine["shards"] == ["gcide"] and gdoc["id"] in {m["document_id"] for m in mine["matches"]}
    status, other = http(served, "POST", "/v1/owner/lookup", passage, token=SHKSPR)
    assert other["in_store"] and other["matches"] == []
    status, err = http(served, "POST", "/v1/owner/lookup", {}, token=GCIDE)
    assert status == 400 and err["error"]["param"] == "text"
    # removals: 401 without or with an unknown token, 403 for another owner's content (nothing is removed)
    assert http(served, "GET", "/v1/owner/removals")[0] == 401
    status, err = http(served, "GET", "/v1/owner/removals", token="nope")
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, err = http(served, "POST", "/v1/owner/removals", {"owner": "shksprdata", "requester": "x",
                                                              "reason": "not mine"}, token=GCIDE)
    assert status == 403 and "shksprdata" in err["error"]["message"]
    status, err = http(served, "POST", "/v1/owner/removals", {"owner": "gcide", "reason": "r"}, token=GCIDE)
    assert status == 400 and "requester" in err["error"]["message"]
    assert http(served, "GET", "/v1/owner/removals", token=GCIDE) == (200, {"removals": []})
    assert http(served, "GET", "/v1/owner/removals/rm-unknown", token=ADMIN)[0] == 404


def test_generation_tokens_when_configured(tiny_model, tiny_store, tmp_path):
    cfg = ServeConfig(model=str(tiny_model), store=str(tiny_store), port=0, http_port=0, admin_token=ADMIN,
                      api_tokens={"tool": "tool-token-0123456789abcdef"})
    server = SiloServer(cfg, lm=SiloLM.load(str(tiny_model), str(tiny_store))).start()
    try:
        for key in ("wrong", ""):
            client = openai.OpenAI(base_url=server.http.url + "/v1", api_key=key or "x", max_retries=0)
            if not key:
                client = client.with_options(default_headers={"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as ei:
                client.completions.create(model="model", prompt=PROMPT, max_tokens=2)
            assert ei.value.status_code == 401
        ok = openai.OpenAI(base_url=server.http.url + "/v1", api_key="tool-token-0123456789abcdef", max_retries=0)
        assert ok.completions.create(model="model", prompt=PROMPT, max_tokens=2).usage.completion_tokens >= 1
        import grpc

        with SiloClient(server.target) as anon, pytest.raises(grpc.RpcError) as ei:  # the gRPC door agrees
            anon.complete(PROMPT, max_tokens=2)
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        server.http.close_intake()  # draining: health and new work answer 503
        assert http(server, "GET", "/health") == (503, {"status": "draining"})
        with pytest.raises(openai.InternalServerError) as ei:
            ok.completions.create(model="model", prompt=PROMPT, max_tokens=2)
        assert ei.value.status_code == 503 and "shutting down" in ei.value.body["message"]
    finally:
        server.stop()
