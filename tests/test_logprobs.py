"""Log-probabilities on both doors of a real server (tiny model, real FAISS store): echo against Score,
generated tokens against re-scoring, token-id and batched prompts, n and best_of, streaming, chat, gRPC."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import openai_client, start_server
from silo.serving.client import SiloClient
from silo.serving.gen import silo_pb2 as pb

openai = pytest.importorskip("openai", reason="the HTTP door is driven with the official openai client")

TEXT = "And the earth was without form, and void; and darkness was upon the face of the deep."
PROMPT = "In the beginning"
TOL = 1e-4


@pytest.fixture(scope="module")
def served(tiny_model, tiny_store):
    server = start_server(tiny_model, tiny_store, max_queue=16, max_batch=4, max_tokens_limit=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oa(served):
    return openai_client(served)


@pytest.fixture(scope="module")
def grpc_client(served):
    with SiloClient(served.target, timeout=120) as c:
        yield c


def bos(served) -> int:
    return served.engine.lm.tokenizer.eos_token_id


@pytest.mark.parametrize("mode", ["parametric", "knn"])
def test_echo_with_no_new_tokens_sums_to_score(oa, grpc_client, mode):
    """The issue's check: completions.create(echo=True, logprobs=5, max_tokens=0) sums to Score's total."""
    r = oa.completions.create(model="model", prompt=TEXT, echo=True, logprobs=5, max_tokens=0,
                              extra_body={"mode": mode})
    choice, score = r.choices[0], grpc_client.score(TEXT, mode=mode)
    lp = choice.logprobs
    assert choice.text == TEXT and r.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(lp.token_logprobs) == len(score.tokens) == r.usage.prompt_tokens - 1  # every token after BOS
    assert abs(sum(lp.token_logprobs) - sum(t.logprob for t in score.tokens)) < TOL
    assert max(abs(a - t.logprob) for a, t in zip(lp.token_logprobs, score.tokens)) < TOL
    assert "".join(lp.tokens) == TEXT and lp.text_offset[0] == 0
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 5 <= len(top) <= 6 and top[tok] == value  # five alternatives and the token itself
        assert max(top.values()) >= value
    ext = choice.model_extra["silo"]["logprobs"]
    assert ext["token_ids"] == [t.id for t in score.tokens]
    assert np.allclose(ext["lmbda"], [t.lmbda for t in score.tokens], atol=1e-6)
    assert (max(ext["lmbda"]) > 0) == (mode == "knn")


@pytest.mark.parametrize("extra", [{"mode": "parametric"}, {"mode": "knn", "lmbda": 0.5}])
def test_generated_tokens_log_probs_are_what_rescoring_gives(oa, served, extra):
    """A completion's token log-probs equal the echo of the same ids re-scored (prompt <= window, one search
    per position, no state beyond the text: true by construction for the LM and a fixed lambda)."""
    r = oa.completions.create(model="model", prompt=PROMPT, echo=True, logprobs=3, max_tokens=24, temperature=1.0,
                              seed=7, extra_body=extra)
    first = r.choices[0]
    ids = first.model_extra["silo"]["logprobs"]["token_ids"]  # prompt, completion (and the end token, if any)
    assert len(ids) >= r.usage.prompt_tokens - 1 + r.usage.completion_tokens
    again = oa.completions.create(model="model", prompt=[bos(served)] + ids, echo=True, logprobs=3, max_tokens=0,
                                  extra_body=extra)
    redo = again.choices[0].logprobs.token_logprobs[1:]  # the first id (BOS) has none
    assert len(redo) == len(ids) == len(first.logprobs.token_logprobs)
    assert max(abs(a - b) for a, b in zip(first.logprobs.token_logprobs, redo)) < TOL


def test_token_id_and_batched_prompts_with_n_and_best_of(oa, served):
    lm = served.engine.lm
    a, b = [bos(served)] + lm.encode("In the beginning"), [bos(served)] + lm.encode("def main():")
    r = oa.completions.create(model="model", prompt=[a, b], n=2, best_of=3, max_tokens=5, seed=11, logprobs=1,
                              echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(a) + len(b)  # each prompt counted once
    returned = sum(len(c.logprobs.tokens) - len(p) for c, p in zip(r.choices, [a, a, b, b]))
    assert r.usage.completion_tokens >= returned - 4  # all six candidates' tokens (an end token is no text)
    for c, p in zip(r.choices, [a, a, b, b]):
        assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None  # nothing before it
        assert c.model_extra["silo"]["logprobs"]["token_ids"][:len(p)] == p
    strings = oa.completions.create(model="model", prompt=["In the beginning", "def main():"], max_tokens=3, seed=1)
    assert len(strings.choices) == 2 and all(c.text for c in strings.choices)


def test_best_of_returns_the_most_probable_candidates(oa):
    kw = {"model": "model", "prompt": PROMPT, "max_tokens": 6, "seed": 5, "logprobs": 0}
    cands = [oa.completions.create(**{**kw, "seed": 5 + j}).choices[0] for j in range(3)]
    best = oa.completions.create(**kw, best_of=3, n=1).choices[0]
    means = [np.mean(c.logprobs.token_logprobs) for c in cands]
    assert best.text == cands[int(np.argmax(means))].text


def test_streamed_log_probs_equal_the_unary_ones(oa):
    kw = {"model": "model", "prompt": PROMPT, "max_tokens": 20, "seed": 3, "logprobs": 2, "echo": True,
          "extra_body": {"lmbda": 0.5}}
    unary = oa.completions.create(**kw).choices[0]
    text, tokens, values, offsets, pieces = "", [], [], [], 0
    for chunk in oa.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
                pieces += bool(c.logprobs.tokens)
    assert text == unary.text and tokens == unary.logprobs.tokens and offsets == unary.logprobs.text_offset
    assert np.allclose(values, unary.logprobs.token_logprobs, atol=1e-9) and pieces > 3


def test_chat_log_probs_unary_and_streamed(oa):
    msgs = [{"role": "user", "content": "Who made the heaven?"}]
    r = oa.chat.completions.create(model="model", messages=msgs, max_tokens=10, seed=2, logprobs=True, top_logprobs=2,
                                   n=2)
    assert len(r.choices) == 2
    for c in r.choices:
        content = c.logprobs.content
        assert "".join(t.token for t in content) == c.message.content
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-12 for t in content)
        assert all(t.bytes == list(t.token.encode()) for t in content)
    streamed = []
    for chunk in oa.chat.completions.create(model="model", messages=msgs, max_tokens=10, seed=2, logprobs=True,
                                            top_logprobs=2, stream=True):
        for c in chunk.choices:
            streamed += [t.logprob for t in (c.logprobs.content if c.logprobs else [])]
    assert np.allclose(streamed, [t.logprob for t in r.choices[0].logprobs.content], atol=1e-9)


def test_log_prob_requests_name_the_field(oa):
    cases = [({"prompt": TEXT, "logprobs": 50}, "logprobs"), ({"prompt": TEXT, "max_tokens": 0}, "max_tokens"),
             ({"prompt": [[1, 2], ["x"]]}, "prompt[1]"), ({"prompt": TEXT, "n": 3, "best_of": 2}, "best_of"),
             ({"prompt": TEXT, "n": 40}, "n"), ({"prompt": TEXT, "best_of": 2, "stream": True}, "best_of"),
             ({"prompt": [10**7]}, "prompt"), ({"prompt": TEXT, "logprobs": True}, "logprobs")]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as ei:
            oa.completions.create(model="model", **body)
        assert ei.value.body["param"] == param, (body, ei.value.body)
    with pytest.raises(openai.BadRequestError) as ei:
        oa.chat.completions.create(model="model", messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    assert ei.value.body["param"] == "top_logprobs"


def test_grpc_carries_the_same_log_probs(grpc_client, oa, served):
    ids = [bos(served)] + served.engine.lm.encode(TEXT)
    res = grpc_client.gen.Complete(pb.CompleteRequest(prompt_ids=ids, params=pb.GenerationParams(
        max_tokens=0, echo=True, logprobs=2, mode="knn")), timeout=120)
    score = grpc_client.score(TEXT, mode="knn")
    assert not res.prompt_logprobs[0].HasField("logprob") and res.prompt_text.endswith(TEXT)
    assert max(abs(t.logprob - s.logprob) for t, s in zip(res.prompt_logprobs[1:], score.tokens)) < TOL
    assert all(len(t.top) == 2 for t in res.prompt_logprobs[1:])
    chunks = list(grpc_client.complete_stream(PROMPT, max_tokens=12, seed=4, logprobs=1))
    done = chunks[-1]
    unary = grpc_client.complete(PROMPT, max_tokens=12, seed=4, logprobs=1)
    assert [t.id for t in done.logprobs] == [t.id for t in unary.logprobs] and len(unary.logprobs) >= 1
    streamed = [t.logprob for ch in grpc_client.gen.CompleteStream(pb.CompleteRequest(
        prompt=PROMPT, params=pb.GenerationParams(max_tokens=12, seed=4, logprobs=1)), timeout=120)
        if ch.WhichOneof("event") == "delta" for t in ch.logprobs]
    assert streamed == [t.logprob for t in unary.logprobs][:len(streamed)] and streamed
    assert all(math.isfinite(t.logprob) for t in unary.logprobs)
