"""Tracing outputs to the training data, and the verbatim guard over it: a real tiny model trained on a corpus
with one planted, distinctive MIT-licensed document, its real training-data index (tokengrams suffix table),
real generations."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import tiny_train_config

PLANT = "The quorvian lattice hums beneath amber spires while zorblax tides count the seventh moon."
PROMPT = "The quorvian lattice hums"
CAP = 40


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(model folder, corpus file, the planted document's text): a tiny model that has learnt the planted
    document by heart (the document repeats one sentence, so greedy decoding gives it back)."""
    from silo.core.config import validate
    from silo.core.corpus import Document, load_documents, write_jsonl
    from silo.training.train import TrainConfig, train

    d = tmp_path_factory.mktemp("planted")
    docs = sorted([x for x in load_documents("pkg:demo/train") if x.domain == "bible"], key=lambda x: x.id)[:6]
    for x in docs:
        x.text = x.text[:3000]
    plant = Document(id="planted/quorvian", text=" ".join([PLANT] * 40), owner="quorvian-press", license="MIT",
                     title="Quorvian Lattice", source="test corpus")
    write_jsonl(docs + [plant], d / "train.jsonl")
    cfg = validate(TrainConfig, tiny_train_config([d / "train.jsonl"], d / "model", max_steps=40))
    train(cfg, progress=False)
    return d / "model", d / "train.jsonl", plant.text


def longest_common_substring(a: str, b: str) -> int:
    """Characters of the longest string found in both (plain exact search, independent of the guard)."""
    best = 0
    for i in range(len(a)):
        n = best + 1
        while i + n <= len(a) and a[i:i + n] in b:
            best = n
            n += 1
    return best


def test_token_index_counts_positions_and_hiding(tmp_path):
    from silo.core.suffix import TokenIndex, build_index, has_index

    docs = [[5, 6, 7, 8], [5, 6, 9], [7, 8, 5, 6, 7]]
    idx = build_index(tmp_path, docs, separator=0, vocab_size=16)
    assert has_index(tmp_path) and idx.documents == 3 and idx.size == 3 + 12 + 1
    assert idx.count([5, 6]) == 3 and idx.count([5, 6, 7]) == 2 and idx.count([9, 9]) == 0
    assert idx.longest_suffix([1, 2, 5, 6, 7]) == 3  # [5, 6, 7] occurs, [2, 5, 6, 7] does not
    assert idx.longest_suffix([0, 5, 6]) == 3  # a context starting with BOS matches documents' beginnings
    tok, cnt = idx.next_counts([5, 6])
    assert dict(zip(tok.tolist(), cnt.tolist())) == {7: 2, 9: 1}
    occ = idx.occurrences([7, 8])
    assert occ.doc.tolist() == [0, 2] and occ.offset.tolist() == [3, 1]
    hidden = TokenIndex.open(tmp_path, 16).hiding([0])
    assert hidden.count([5, 6]) == 2 and hidden.count([7, 8, 0]) == 0
    assert dict(zip(*map(np.ndarray.tolist, hidden.next_counts([5, 6])))) == {7: 1, 9: 1}
    assert hidden.unigram()[5] == 2
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="outside"):
        build_index(tmp_path / "bad", [[99]], 0, 16)


def test_training_writes_an_index_tied_to_the_model(planted):
    from silo.training.index import TrainingIndex, TrainingIndexError

    model, _, text = planted
    prov = json.loads((model / "provenance.json").read_text())
    info = json.loads((model / "training-index" / "index.json").read_text())
    assert info["fingerprint"] == prov["fingerprint"] and info["documents"] == len(prov["documents"])
    ti = TrainingIndex.open(model, prov["fingerprint"])
    assert [d.id for d in ti.documents] == [d["id"] for d in prov["documents"]]
    assert ti.documents[-1].text == text and ti.documents[-1].license == "MIT"
    with pytest.raises(TrainingIndexError, match="made for model"):
        TrainingIndex.open(model, "sha256:" + "0" * 64)


def test_silo_index_rebuilds_for_an_existing_model_and_refuses_another_corpus(planted, tmp_path):
    from silo.core.config import validate
    from silo.core.corpus import load_documents, write_jsonl
    from silo.training.train import TrainConfig, index_trained_model

    model, corpus, _ = planted
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    before = json.loads((copy / "training-index" / "index.json").read_text())
    shutil.rmtree(copy / "training-index")
    cfg = validate(TrainConfig, tiny_train_config([corpus], copy))
    info = index_trained_model(cfg, str(copy), progress=False)
    assert info["tokens"] == before["tokens"] and info["fingerprint"] == before["fingerprint"]
    other = tmp_path / "other.jsonl"
    write_jsonl(load_documents(str(corpus))[:-1], other)
    with pytest.raises(ValueError, match="differ from"):
        index_trained_model(validate(TrainConfig, tiny_train_config([other], copy)), str(copy), progress=False)


def test_a_planted_document_is_traced_with_its_notice(planted):
    from silo import SamplingParams, SiloLM

    model, _, text = planted
    lm = SiloLM.load(str(model))
    comp = lm.complete(PROMPT, SamplingParams(max_new_tokens=48, temperature=0))
    assert PLANT[len(PROMPT):len(PROMPT) + 40] in comp.text  # it gives the document back
    spans = [t for a in comp.attributions for t in a.training]
    assert spans and all(t.document_id == "planted/quorvian" and t.license == "MIT" for t in spans)
    for t in spans:  # every offset is exact
        assert comp.text[t.start:t.end] == text[t.doc_start:t.doc_end] and t.end - t.start >= 32
    assert any(a.parametric_share == 1.0 and a.training for a in comp.attributions)  # the weights, not a store
    notices = [n for n in comp.notices if n.origin == "training"]
    assert [(n.document_id, n.license) for n in notices] == [("planted/quorvian", "MIT")]
    assert "Quorvian Lattice" in notices[0].text()


def test_the_guard_caps_training_text_of_a_capped_tier(planted):
    from silo import SamplingParams, SiloLM
    from silo.model.output_policy import OutputPolicy

    model, _, text = planted
    lm = SiloLM.load(str(model))
    free = lm.complete(PROMPT, SamplingParams(max_new_tokens=48, temperature=0))
    assert longest_common_substring(free.text, text) > CAP  # unguarded, it repeats more than the cap
    policy = OutputPolicy.model_validate({"tiers": {"sw": {"max_verbatim_chars": CAP}}})
    runs = [lm.complete(PROMPT, SamplingParams(max_new_tokens=48, temperature=t, seed=s), policy=policy)
            for t, s in ((0, 0), (1.0, 1), (1.0, 2))]
    for comp in runs:
        assert longest_common_substring(comp.text, text) <= CAP, comp.text
    events = [e for c in runs for e in c.guard_events]
    assert events and all(e.shard == "training" and e.document_id == "planted/quorvian" and e.cap == CAP
                          for e in events)
    # a policy that leaves the tier uncapped changes nothing
    other = OutputPolicy.model_validate({"tiers": {"by": {"max_verbatim_chars": CAP}}})
    same = lm.complete(PROMPT, SamplingParams(max_new_tokens=48, temperature=0), policy=other)
    assert same.text == free.text and not same.guard_events
