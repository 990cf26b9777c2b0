"""Continuous batching: a request's output does not depend on what it is batched with."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from silo.model.batch import BatchDecoder, Decoding, KVBatch, prefill_groups
from silo.model.detok import IncrementalDetokenizer
from silo.model.lm import SiloLM
from silo.model.request import GenerationRequest, RetrievalParams
from silo.model.sampling import SamplingParams, sample, sample_rows
from silo.serving.engine import Engine, Job

PROMPTS = ["The quick brown", "To be, or not to be", "In the beginning", "def main():\n   ", "A dictionary is"]


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_store):
    return SiloLM.load(str(tiny_model), str(tiny_store))


def _alone(lm, prompt, mode, n=12, **kw):
    return lm.complete(prompt, SamplingParams(max_new_tokens=n, temperature=0, **kw), lm.retriever(mode),
                       attribute=False)


def greedy(prompt, n, mode) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n, temperature=0.0),
                             retrieval=RetrievalParams(mode=mode))


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


def test_joint_prefill_gives_what_each_prompt_gives_alone(lm, monkeypatch):
    """Prompts joining together run as one left-padded forward; each still generates what it generates
    alone. A much longer prompt gets a forward of its own (tests/test_gate.py: one search of the prompt
    positions of all of them, for the gated mixture)."""
    assert prefill_groups([5, 4, 40, 6]) == [[1, 0, 3], [2]]
    long = " ".join(["word"] * 40)
    prompts = PROMPTS + [long]
    want = {(p, m): _alone(lm, p, m) for p in prompts for m in ("parametric", "knn")}
    forwards = []
    real_forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda ids, *a, **kw: forwards.append(tuple(ids.shape)) or real_forward(ids, *a, **kw))
    dec = BatchDecoder(lm)
    knn = lm.retriever("knn")
    seqs = {(p, m): Decoding([lm.tokenizer.eos_token_id] + lm.encode(p), SamplingParams(max_new_tokens=12, temperature=0),
                             knn if m == "knn" else None) for p in prompts for m in ("parametric", "knn")}
    dec.add_many(list(seqs.values()))
    assert len(forwards) == 2 and sorted(shape[0] for shape in forwards) == [2, 2 * len(PROMPTS)]
    assert dec.active == len(seqs) and dec.kv.rows == dec.active
    while dec.active:
        dec.step()
    for key, seq in seqs.items():
        assert seq.completion.tokens == want[key].tokens, key
        assert seq.completion.text == want[key].text, key


def test_rows_sample_what_they_sample_alone():
    """The batched sampler gives each row the token the one-row sampler gives it, with mixed settings."""
    gen = torch.Generator().manual_seed(0)
    settings = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.7, top_p=0.9, seed=2),
                SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, top_k=40, seed=4),
                SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, top_p=0.9, seed=6)]
    for trial in range(40):
        p = torch.softmax(torch.randn(len(settings), 512, generator=gen, dtype=torch.float64) * (1 + trial % 4), -1)
        batched = sample_rows(p, settings, [sp.generator() for sp in settings])
        alone = [sample(p[i], sp, sp.generator()) for i, sp in enumerate(settings)]
        assert batched == alone
        assert batched[2] == int(torch.argmax(p[2]))


def test_waiting_deltas_are_joined_for_a_reader_that_fell_behind():
    job = Job("generate", None)
    for piece in ["In", " the", " beginning"]:
        job.emit(piece)
    job.events.put(("done", "result"))
    assert list(job.stream(timeout=1)) == [("delta", "In the beginning"), ("done", "result")]
    job = Job("generate", None)
    job.emit("a")
    job.events.put(("error", ValueError("boom")))
    got = job.stream(timeout=1)
    assert next(got) == ("delta", "a")  # a delta before an error still arrives
    with pytest.raises(ValueError):
        next(got)


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
        reqs = [greedy(p, 10, m) for p in PROMPTS[:3] for m in ("parametric", "knn")]
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
            alone = _alone(lm, r.prompt, r.retrieval.mode, n=10)
            assert streamed == res.text == alone.text
            assert res.completion_tokens == len(alone.tokens)
            if r.retrieval.mode == "knn":
                assert res.attributions and res.store_generation == lm.store.generation
    finally:
        engine.stop()


def test_engine_runs_the_prompts_of_requests_admitted_together_at_once(lm):
    engine = Engine(lm, max_queue=16, max_batch=8)
    sizes = []
    real = engine.decoder.add_many
    engine.decoder.add_many = lambda seqs: sizes.append(len(seqs)) or real(seqs)
    gate = threading.Event()
    try:
        blocker = threading.Thread(target=engine.control, args=(gate.wait,))
        blocker.start()  # the worker waits in a control job while four requests queue up
        while not engine._busy:
            threading.Event().wait(0.01)
        reqs = [greedy(p, 6, m) for p, m in
                [(PROMPTS[0], "knn"), (PROMPTS[1], "knn"), (PROMPTS[2], "parametric"), (PROMPTS[3], "knn")]]
        jobs = [engine.generate(r) for r in reqs]
        gate.set()
        blocker.join(30)
        texts = [job.result(timeout=120).text for job in jobs]
        assert sizes[0] == 4
        assert texts == [_alone(lm, r.prompt, r.retrieval.mode, n=6).text for r in reqs]
    finally:
        gate.set()
        engine.stop()


DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()


@pytest.mark.parametrize("device", DEVICES)
def test_mixture_runs_on_the_model_device(tiny_model, tiny_store, device):
    """The kNN distribution is moved to the LM's log-probs' device and dtype before mixing."""
    lm = SiloLM.load(str(tiny_model), str(tiny_store), device=device)
    knn = lm.retriever("knn", k=8, lmbda=0.5, tau=1.0)
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


def test_batch_bench_reports_each_level_and_the_split_of_a_step(tiny_model, tiny_store, capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "batch_bench.py"
    spec = importlib.util.spec_from_file_location("batch_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", str(tiny_model), "--store", str(tiny_store), "--reps", "1", "--tokens", "4",
                       "--duration", "0.5", "--max-batch", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["decoder"], ["engine"])]
    assert sorted((r[0], r[1], int(r[2])) for r in rows) == sorted(
        (level, mode, n) for level in ("decoder", "engine") for mode in ("parametric", "knn") for n in (1, 4))
    assert all(float(r[3]) > 0 for r in rows)  # tokens/s
    knn = [r for r in rows if r[:3] == ["decoder", "knn", "4"]][0]
    assert float(knn[5]) > 0 and float(knn[6]) > 0  # a kNN step searches and runs the model
    assert "knn: tokens/s at 4 over 1 -- decoder" in out and "at 1 stream:" in out
