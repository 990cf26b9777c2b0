"""More than one server over one store folder: a removal reaches every server that serves it.

Plain `silo serve` processes over shared storage pick a newer generation up by themselves (serve.watch_seconds);
replicas on a Ray cluster (`silo serve --ray`) are switched by the store controller before a removal is
called applied (tests further below, with a real local Ray cluster)."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

ADMIN = "admin-token-0123456789abcdef"
OWNER = "shksprdata"


def plain_server(model, store, **over) -> SiloServer:
    cfg = ServeConfig(model=str(model), store=str(store), port=0, admin_token=ADMIN, **over)
    return SiloServer(cfg, lm=SiloLM.load(str(model), str(store))).start()


def owner_sources(client, prompt: str) -> set[str]:
    r = client.complete(prompt, max_tokens=16, temperature=0, lmbda=0.9, return_attributions=True)
    return {s.owner for a in r.attributions for s in a.sources}, r.store_generation


def test_plain_servers_over_one_folder_pick_up_each_others_removals(tiny_model, tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    watch = 0.5
    a, b = plain_server(tiny_model, store, watch_seconds=watch), plain_server(tiny_model, store, watch_seconds=watch)
    try:
        doc = b.engine.lm.store.shards[[sh.name for sh in b.engine.lm.store.shards].index(OWNER)].documents[0]
        prompt = doc.text[:120]
        with SiloClient(a.target, token=ADMIN, timeout=300) as ca, SiloClient(b.target, token=ADMIN, timeout=300) as cb:
            owners, generation = owner_sources(cb, prompt)
            assert OWNER in owners and generation == 1
            status = ca.submit_removal(owner=OWNER, requester=OWNER, reason="opt-out")
            assert status.status == "applied" and status.generation == 2
            # B serves the new generation within the documented bound (a poll, plus opening the changed
            # shards), without anyone calling ReloadDatastore on it
            t0 = time.monotonic()
            while b.engine.lm.store.generation < 2:
                assert time.monotonic() - t0 < 60, "B never picked up the removal"
                time.sleep(0.05)
            owners, generation = owner_sources(cb, prompt)
            assert OWNER not in owners and generation >= 2
            assert OWNER not in {sh.name for sh in cb.info().store.shards}
    finally:
        a.dataowner.wait_background(300)
        a.stop()
        b.stop()


def test_cluster_settings_are_checked_before_anything_starts(tmp_path):
    from silo.core.config import ConfigError, validate
    from silo.serving.cluster.config import ClusterConfig
    from silo.serving.cluster.deploy import check_servable

    with pytest.raises(ConfigError, match="cluster: Value error, give either replicas"):
        validate(ClusterConfig, {"replicas": 2, "autoscaling": {"max_replicas": 3}}, prefix="cluster", source="c.yaml")
    with pytest.raises(ConfigError, match=r"cluster\.autoscaling.*max_replicas \(1\) is below min_replicas \(2\)"):
        validate(ClusterConfig, {"replicas": None, "autoscaling": {"min_replicas": 2, "max_replicas": 1}},
                 prefix="cluster", source="c.yaml")
    scaled = validate(ClusterConfig, {"replicas": None, "autoscaling": {"max_replicas": 3}}, prefix="cluster",
                      source="c.yaml").deployment_options(max_ongoing=24)
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    assert scaled["max_ongoing_requests"] == 24 and scaled["ray_actor_options"]["num_cpus"] == 1
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    with pytest.raises(ConfigError, match="serve.tls_cert"):
        check_servable(ServeConfig(model="m", store="s", tls_cert=str(cert), tls_key=str(cert)))
    with pytest.raises(ConfigError, match="serve.store"):
        check_servable(ServeConfig(model="m"))


# ----------------------------------------------------------------------------------------- on Ray

@pytest.fixture(scope="module")
def ray_address():
    """A real local Ray cluster: a head node and a second node, 1 CPU each (a replica per node)."""
    pytest.importorskip("ray")
    from silo.serving.cluster.local import LocalRayCluster

    with LocalRayCluster(nodes=2, cpus=1) as address:
        yield address


@pytest.fixture(scope="module")
def cluster(ray_address, tiny_model, tiny_store, tmp_path_factory):
    from silo.serving.cluster.config import ClusterConfig
    from silo.serving.cluster.deploy import serve_on_ray

    from silo.serving.cluster.local import free_port

    store = tmp_path_factory.mktemp("cluster") / "store"
    shutil.copytree(tiny_store, store)
    ports = [free_port(), free_port()]
    cfg = ServeConfig(model=str(tiny_model), store=str(store), port=ports[0], http_port=ports[1], admin_token=ADMIN,
                      owner_tokens={OWNER: OWNER_TOKEN, "gcide": GCIDE_TOKEN}, device="cpu", watch_seconds=1.0)
    handle = serve_on_ray(cfg, ClusterConfig(replicas=2, rollout_timeout_s=90, namespace=f"silo-test-{ports[0]}",
                                             controller=f"silo-store-controller-{ports[0]}"), ray_address)
    yield handle, store
    handle.stop()


OWNER_TOKEN, GCIDE_TOKEN = "shakespeare-token", "gcide-token-0123456789abcdef"


def _replicas_seen(request_ids) -> set[str]:
    return {rid.rsplit("-", 1)[0] for rid in request_ids}


def test_two_replicas_answer_through_one_endpoint_on_both_doors(cluster):
    import openai
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    handle, _ = cluster
    assert len(handle.replicas()) == 2
    nodes = {x["node"] for x in handle.broadcast("info")}
    assert len(nodes) == 2  # one replica per node of the cluster

    def grpc_calls(i):
        with SiloClient(handle.grpc_target, timeout=120) as c:
            return [c.complete("In the beginning", max_tokens=8, seed=i * 10 + j).request_id for j in range(3)]

    oa = openai.OpenAI(base_url=handle.http_url + "/v1", api_key="none", max_retries=0, timeout=120)

    def http_calls(i):
        out = []
        for j in range(3):
            r = oa.completions.create(model="model", prompt="To be, or not", max_tokens=8, seed=i * 10 + j)
            out.append(r.choices[0].model_extra["silo"]["request_id"])
        return out

    with ThreadPoolExecutor(8) as ex:
        grpc_ids = [x for ids in ex.map(grpc_calls, range(8)) for x in ids]
        http_ids = [x for ids in ex.map(http_calls, range(8)) for x in ids]
    assert _replicas_seen(grpc_ids) == _replicas_seen(http_ids) == set(handle.replicas())  # both take traffic
    with urllib.request.urlopen(handle.http_url + "/health", timeout=60) as r:
        assert r.status == 200 and r.headers["x-silo-store-generation"] == "1"
    with grpc.insecure_channel(handle.grpc_target) as ch:  # grpc.health.v1 through the gRPC proxy
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    with SiloClient(handle.grpc_target, timeout=60) as c:  # a refusal keeps its status and field through the proxy
        with pytest.raises(grpc.RpcError) as ei:
            c.complete("In the beginning", max_tokens=0)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and ei.value.details().startswith("params.max_tokens")


def test_a_removal_reaches_every_replica_before_it_is_applied(cluster):
    import ray

    handle, store = cluster
    doc = next(d for sh in Datastore.open(store).shards if sh.name == OWNER for d in sh.documents)
    prompt, truth = doc.text[200:320], doc.text[320:420]
    before = handle.broadcast("generate_here", prompt, 24)
    assert all(OWNER in r["owners"] for r in before)  # every replica continues the play from the store
    results, stop, errors = [], threading.Event(), []

    def stream(i):  # generations in flight on both replicas while the removal goes through
        with SiloClient(handle.grpc_target, timeout=120) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    *_, done = c.complete_stream(prompt, max_tokens=16, seed=i, lmbda=0.9, return_attributions=True)
                except grpc.RpcError as exc:
                    errors.append(exc)
                    return
                results.append((t0, done.store_generation, {s.owner for a in done.attributions for s in a.sources}))

    seen_applied = []

    def watch_status(rid_box):  # whoever sees `applied`, every replica already serves the new generation
        with SiloClient(handle.grpc_target, token=ADMIN, timeout=60) as c:
            while not stop.is_set():
                try:
                    status = c.get_removal(rid_box[0]).status if rid_box else "received"
                except grpc.RpcError as exc:  # not recorded yet
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    continue
                if status in ("applied", "compacted", "verified"):
                    seen_applied.append(min(x["generation"] for x in handle.broadcast("info")))
                    return
                time.sleep(0.01)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    rid_box: list[str] = []
    threads.append(threading.Thread(target=watch_status, args=(rid_box,)))
    for t in threads:
        t.start()
    try:
        with SiloClient(handle.grpc_target, token=OWNER_TOKEN, timeout=300) as owner:
            rid_box.append(f"rm-test-{int(time.time())}")
            status = owner.submit_removal(owner=OWNER, requester=OWNER, reason="opt-out", request_id=rid_box[0])
            applied_at = time.monotonic()
        assert status.status == "applied"
        generation = status.generation
        time.sleep(0.5)  # let the streams run a few more requests on the new generation
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors and results, errors  # no stream failed
    assert seen_applied and seen_applied[0] >= generation
    later = [r for r in results if r[0] > applied_at]
    assert later and all(gen >= generation and OWNER not in owners for _, gen, owners in later)
    info = handle.broadcast("info")
    assert all(x["generation"] >= generation for x in info)
    probes = handle.broadcast("probe_removed", [doc], OWNER)
    assert [p["hits"] for p in probes] == [0, 0] and all(p["queries"] > 0 for p in probes)
    after = handle.broadcast("generate_here", prompt, 24)
    assert all(OWNER not in r["owners"] and truth[:40] not in r["text"] for r in after)
    ray.get(handle.controller.wait_background.remote(300))
    with SiloClient(handle.grpc_target, token=ADMIN, timeout=300) as c:
        receipt = c.get_receipt(rid_box[0])
    acks = [set(r["acks"]) for r in receipt.rollouts]
    assert acks and all(a == set(handle.replicas()) for a in acks)  # every replica acknowledged each step
    assert receipt.passed and receipt.verification["replicas"]["passed"]


def test_a_replica_killed_during_a_removal_comes_back_on_the_new_generation(cluster):
    import ray

    handle, store = cluster
    original = set(handle.replicas())
    victim_id, victim = sorted(handle.replicas().items())[0]
    doc = Datastore.open(store).shards[0].documents[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    with SiloClient(handle.grpc_target, token=ADMIN, timeout=300) as c:  # the other replica takes the call
        status = c.submit_removal(document_ids=[doc.id], requester="admin", reason="test")
        assert status.status == "applied"
        # Ray Serve replaces the killed replica; the replacement opens the store's current generation (or
        # acknowledges it in the rollout, if it was already starting) before it is routed any call
        end = time.monotonic() + 180
        while True:
            info = [x for x in handle.broadcast("info") if isinstance(x, dict)]
            if len(info) == 2 or time.monotonic() > end:
                break
            time.sleep(0.5)
        assert len(info) == 2 and victim_id not in {x["replica"] for x in info}
        assert all(x["generation"] >= status.generation for x in info)
        reborn = [x for x in info if x["replica"] not in {victim_id, *original}]
        assert len(reborn) == 1 and reborn[0]["generation"] >= status.generation
        state = c.get_removal(status.request_id)
        assert state.status in ("applied", "compacted", "verified")
