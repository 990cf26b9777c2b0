"""Continuous batching: a request's output does not depend on what it is batched with."""

from __future__ import annotations

import threading

import pytest
import torch

from silo.model.batch import BatchDecoder, KVBatch
from silo.model.batch import Sequence as Decoding
from silo.model.detok import IncrementalDetokenizer
from silo.model.lm import SiloLM
from silo.model.sampling import SamplingParams
from silo.serving.engine import Engine
from silo.serving.requests import GenRequest

PROMPTS = ["The quick brown", "To be, or not to be", "In the beginning", "def main():\n   ", "A dictionary is"]


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_store):
    return SiloLM.load(str(tiny_model), str(tiny_store))


def _alone(lm, prompt, mode, n=12, **kw):
    return lm.complete(prompt, SamplingParams(max_new_tokens=n, temperature=0, **kw), lm.retriever(mode),
                       attribute=False)


def test_greedy_output_is_the_same_batched_and_alone(lm):
    """Sequences of different prompt lengths, modes and lengths, joining at different steps, in one batch."""
    want = {(p, m): _alone(lm, p, m) for p in PROMPTS for m in ("parametric", "knn")}
    dec = BatchDecoder(lm)
    knn = lm.retriever("knn")  # shared by the kNN sequences: one search per step for all of them
    todo = [(p, m) for p in PROMPTS for m in ("parametric", "knn")]
    seqs = {}
    steps = 0
    while todo or dec.active:
        if todo and steps % 2 == 0:  # a new sequence joins every other step
            p, m = todo.pop(0)
            ids = [lm.tokenizer.eos_token_id] + lm.encode(p)
            seqs[(p, m)] = dec.add(Decoding(ids, SamplingParams(max_new_tokens=12, temperature=0),
                                            knn if m == "knn" else None))
        dec.step()
        steps += 1
        assert dec.kv.rows == dec.active
    assert steps < 12 * len(want)  # they advanced together
    for key, seq in seqs.items():
        assert seq.completion.tokens == want[key].tokens, key
        assert seq.completion.text == want[key].text, key
        assert seq.completion.finish_reason == want[key].finish_reason


def test_padding_is_trimmed_when_the_longest_sequence_leaves(lm):
    kv = KVBatch()
    dec = BatchDecoder(lm)
    dec.kv = kv
    long = [lm.tokenizer.eos_token_id] + lm.encode(" ".join(["word"] * 40))
    short = [lm.tokenizer.eos_token_id] + lm.encode("Hi")
    dec.add(Decoding(long, SamplingParams(max_new_tokens=2, temperature=0)))
    dec.add(Decoding(short, SamplingParams(max_new_tokens=6, temperature=0)))
    assert kv.mask.shape[1] == len(long) and kv.mask[1].sum() == len(short)
    dec.step()
    dec.step()  # the long one finishes here
    assert dec.active == 1 and kv.mask.shape[1] == len(short) + 2 and bool(kv.mask.all())


def test_cancelling_one_sequence_leaves_the_others_unchanged(lm):
    want = _alone(lm, PROMPTS[1], "knn")
    dec = BatchDecoder(lm)
    stop = threading.Event()
    a = dec.add(Decoding([lm.tokenizer.eos_token_id] + lm.encode(PROMPTS[0]),
                         SamplingParams(max_new_tokens=12, temperature=0), lm.retriever("knn"), should_stop=stop.is_set))
    b = dec.add(Decoding([lm.tokenizer.eos_token_id] + lm.encode(PROMPTS[1]),
                         SamplingParams(max_new_tokens=12, temperature=0), lm.retriever("knn")))
    dec.step()
    stop.set()
    while dec.active:
        dec.step()
    assert a.completion.finish_reason == "cancelled" and len(a.completion.tokens) == 1
    assert b.completion.tokens == want.tokens


def test_incremental_detokenisation_matches_a_full_decode(lm):
    tok = lm.tokenizer
    for text in ["Plain words, then punctuation; and more.", "naïve café — “quotes” ✓ 日本語 🙂 end"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        d = IncrementalDetokenizer(tok)
        parts = [d.push(i) for i in ids] + [d.flush()]
        assert "".join(parts) == tok.decode(ids, clean_up_tokenization_spaces=False)
        assert not any("\ufffd" in p for p in parts)  # a character is released only once complete


def test_engine_batches_concurrent_requests_with_the_same_output(lm):
    """Through the serving engine: 6 concurrent greedy requests, streamed, equal their unbatched results."""
    engine = Engine(lm, max_queue=16, max_batch=4)
    try:
        reqs = [GenRequest(prompt=p, max_tokens=10, temperature=0.0, mode=m)
                for p in PROMPTS[:3] for m in ("parametric", "knn")]
        jobs = [engine.generate(r) for r in reqs]
        out = []
        for job in jobs:
            deltas, res = [], None
            for kind, value in job.stream(timeout=120):
                if kind == "delta":
                    deltas.append(value)
                else:
                    res = value
            out.append(("".join(deltas), res))
        assert engine.drain(10) and engine.metrics.batch_size._value.get() == 0  # all left the batch
        steps = engine.metrics.steps._value.get()
        assert steps < sum(r.completion_tokens for _, r in out)  # several sequences per step
        for r, (streamed, res) in zip(reqs, out):
            alone = _alone(lm, r.prompt, r.mode, n=10)
            assert streamed == res.text == alone.text
            assert res.completion_tokens == len(alone.tokens)
            if r.mode == "knn":
                assert res.attributions and res.store_generation == lm.store.generation
    finally:
        engine.stop()


DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
def test_mixture_runs_on_the_model_device(tiny_model, tiny_store, device):
    """The kNN distribution is moved to the LM's log-probs' device and dtype before mixing."""
    lm = SiloLM.load(str(tiny_model), str(tiny_store), device=device)
    knn = lm.retriever("knn", k=8, lmbda=0.5, temperature=1.0)
    ids = [lm.tokenizer.eos_token_id] + lm.encode(PROMPTS[1])
    hidden, logits, _ = lm.forward(torch.tensor([ids], device=lm.device))
    logp = torch.log_softmax(logits[0].double(), -1)
    state = knn.begin(hidden[0].cpu().numpy(), logp, ids)
    p, rows = knn.next_token(hidden[0, -1:].cpu().numpy(), logp[-1:], [state])
    assert p.device == logp.device and p.dtype == logp.dtype
    assert abs(float(p.sum()) - 1.0) < 1e-6 and rows[0].lmbda == 0.5


@pytest.mark.parametrize("device", DEVICES)
def test_batched_generation_on_a_device(tiny_model, tiny_store, device):
    """The engine's path on `device` (cpu here; cuda in scripts/gpu_check.sh): kNN and parametric
    sequences batched together give what each gives alone, in float32, with attributions."""
    lm = SiloLM.load(str(tiny_model), str(tiny_store), device=device, dtype="float32")
    assert str(lm.device).startswith(device)
    alone = {m: _alone(lm, PROMPTS[0], m) for m in ("parametric", "knn")}
    dec = BatchDecoder(lm)
    knn = lm.retriever("knn")
    seqs = {m: dec.add(Decoding([lm.tokenizer.eos_token_id] + lm.encode(PROMPTS[0]),
                                SamplingParams(max_new_tokens=12, temperature=0), knn if m == "knn" else None))
            for m in ("parametric", "knn")}
    while dec.active:
        dec.step()
    for m, seq in seqs.items():
        assert seq.completion.tokens == alone[m].tokens
    assert lm.attribute(seqs["knn"].completion, knn)
