"""The real lm-evaluation-harness on SILO, both paths: the in-process `silo` model (`lm_eval --model silo`,
found through the installed silo-lm-eval.pth) and `local-completions` against a real server's OpenAI door,
on local tasks (tests/lm_eval: a two-choice log-likelihood task, a rolling perplexity task and a greedy
generation task over local JSONL; no hub). Per document the two paths agree with each other and with
Score within 1e-4."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import start_server
from silo.model.lm import SiloLM
from silo.serving.client import SiloClient

pytest.importorskip("lm_eval", reason="the lm-eval tests run the real harness (the test extra installs it)")

ROOT = Path(__file__).resolve().parent.parent
TASKS = "silo_choice,silo_rolling,silo_gen"
TOL = 1e-4


def lm_eval(model: str, model_args: str, out: Path, *extra: str) -> dict[str, list[dict]]:
    """Run the lm_eval command from the repository root (the tasks' data paths are relative to it); the
    per-task samples by doc id."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "cache")}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", model, "--model_args", model_args,
           "--include_path", "tests/lm_eval", "--tasks", TASKS, "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {}
    for task in TASKS.split(","):
        (path,) = glob.glob(f"{out}/*/samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    return samples


@pytest.fixture(scope="module")
def runs(tiny_model, tiny_store, tmp_path_factory):
    """Both paths over the same tasks (kNN-LM over the tiny store), and a SiloLM to compute what Score gives."""
    out = tmp_path_factory.mktemp("lm-eval")
    server = start_server(tiny_model, tiny_store, max_queue=16, max_tokens_limit=64)
    try:
        http = lm_eval("local-completions", f"model=model,base_url={server.http.url}/v1/completions,"
                       f"tokenizer={tiny_model},tokenizer_backend=huggingface,max_length=128", out / "http")
        with SiloClient(server.target, timeout=120) as client:
            scores = {}
            for s in http["silo_rolling"]:
                scores[s["doc_id"]] = sum(t.logprob for t in client.score(s["doc"]["text"], mode="knn").tokens)
    finally:
        server.stop()
    local = lm_eval("silo", f"model={tiny_model},store={tiny_store},mode=knn", out / "silo", "--batch_size", "4")
    return http, local, scores


def test_rolling_log_likelihoods_agree_with_score(runs):
    http, local, scores = runs
    for a, b in zip(http["silo_rolling"], local["silo_rolling"]):
        x, y = float(a["resps"][0][0]), float(b["resps"][0][0])
        assert abs(x - y) < TOL and abs(x - scores[a["doc_id"]]) < TOL, (a["doc_id"], x, y, scores[a["doc_id"]])


def test_multiple_choice_log_likelihoods_agree(runs, tiny_model, tiny_store):
    http, local, _ = runs
    lm = SiloLM.load(str(tiny_model), str(tiny_store))
    knn = lm.retriever("knn")
    for a, b in zip(http["silo_choice"], local["silo_choice"]):
        assert len(a["resps"]) == len(b["resps"]) == 2
        pairs = [(arg["arg_0"], arg["arg_1"]) for arg in a["arguments"].values()]  # (context, " " + choice)
        for (x, gx), (y, gy), (context, continuation) in zip((r[0] for r in a["resps"]), (r[0] for r in b["resps"]),
                                                             pairs):
            assert abs(float(x) - float(y)) < TOL and gx == gy
            ctx = lm.encode(context)  # lm-eval's split: the context's tokens, then the rest of the whole's
            cont = lm.encode(context + continuation)[len(ctx):]
            want = lm.score_ids([ctx + cont], knn)[0].logp[len(ctx) - 1:].sum()
            assert abs(float(x) - want) < TOL
        assert a["acc"] == b["acc"]


def test_greedy_generations_agree(runs):
    http, local, _ = runs
    got = [(a["resps"][0][0], b["resps"][0][0]) for a, b in zip(http["silo_gen"], local["silo_gen"])]
    assert all(x == y for x, y in got), got
    assert any(x for x, _ in got)
