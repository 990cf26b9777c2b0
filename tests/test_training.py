"""Tokenizer round trip, a short real training run, provenance, resume, and the `silo train` CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from silo.cli import main
from silo.core.config import ConfigError, load_section, validate
from silo.core.fingerprint import model_fingerprint
from silo.training.tokenizer import train_tokenizer
from silo.training.train import TrainConfig, train
from conftest import tiny_train_config, write_docs


def test_tokenizer_round_trip(tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x ** 2\n"] * 50
    tok = train_tokenizer(texts, vocab_size=400)
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in ["Hello, wörld! ✓ — 你好", "def f(x):\n\treturn x  # tabs", "   leading spaces"]:
        assert loaded.decode(loaded(s, add_special_tokens=False)["input_ids"]) == s
    assert loaded.eos_token == "<|endoftext|>"
    assert "<|assistant|>" in loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                          add_generation_prompt=True)


def test_training_loss_falls_and_checkpoint_reloads(tiny_model):
    prov = json.loads((tiny_model / "provenance.json").read_text())
    hist = prov["history"]
    assert hist[-1]["heldout_loss"] < hist[0]["heldout_loss"] - 0.2
    # provenance: only allowed tiers, every training document with its hash and token count
    assert set(prov["policy"]["allowed_tiers"]) == {"pd", "sw"}
    assert {d["tier"] for d in prov["documents"]} <= {"pd", "sw"}
    assert len(prov["documents"]) == prov["summary"]["kept_documents"] == 40
    assert all(len(d["sha256"]) == 64 and d["tokens"] > 0 for d in prov["documents"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    assert model_fingerprint(model, tok) == prov["fingerprint"]
    ids = tok("In the beginning", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 8


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path, corpus_dir):
    corpus = [corpus_dir / "train.jsonl"]
    small = dict(max_steps=10, save_every=5, eval_every=5, model={**tiny_train_config([], "")["model"],
                                                                   "num_layers": 1})
    full = validate(TrainConfig, tiny_train_config(corpus, tmp_path / "full", **small))
    train(full, progress=False)
    # run a copy that is interrupted after step 5 (its checkpoint stays), then resume it to step 10
    part_cfg = tiny_train_config(corpus, tmp_path / "part", **small)
    part_cfg["checkpoint_dir"] = str(tmp_path / "ckpt")
    first = validate(TrainConfig, {**part_cfg, "max_steps": 10})
    import silo.training.train as tr
    real_lr_at = tr.lr_at

    class Stop(Exception):
        pass

    def interrupting_lr_at(step, cfg):
        if step == 6:
            raise Stop()
        return real_lr_at(step, cfg)

    tr.lr_at = interrupting_lr_at
    try:
        with pytest.raises(Stop):
            train(first, progress=False)
    finally:
        tr.lr_at = real_lr_at
    assert json.loads((tmp_path / "ckpt" / "trainer_state.json").read_text())["step"] == 5
    train(first, progress=False)
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full"))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "part"))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert not (tmp_path / "ckpt").exists()


def test_cli_train_refuses_gpl_document(tmp_path, corpus_dir, capsys):
    lines = (corpus_dir / "train.jsonl").read_text().splitlines()[:5]
    docs = [json.loads(x) for x in lines] + [{"id": "gcide/entry-7", "text": "A GPL dictionary entry.",
                                              "owner": "gcide", "license": "GPL-3.0-or-later"}]
    corpus = write_docs(tmp_path / "mixed.jsonl", docs)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"train": tiny_train_config([corpus], tmp_path / "m", max_steps=2)}))
    assert main(["train", "--config", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert "gcide/entry-7" in err and "GPL-3.0-or-later" in err
    assert not (tmp_path / "m").exists()
    # the explicit flag drops it and reports the count; provenance then has no copyleft document
    assert main(["train", "--config", str(cfg_path), "--drop-disallowed"]) == 0
    prov = json.loads((tmp_path / "m" / "provenance.json").read_text())
    assert prov["summary"]["refused_documents"] == 1
    assert [d["id"] for d in prov["refused_documents"]] == ["gcide/entry-7"]
    assert all(d["tier"] in ("pd", "sw") for d in prov["documents"])


def test_bad_config_value_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"corpus": ["x"], "output_dir": "o", "lr": -1,
                                           "model": {"hidden_size": 30, "num_heads": 4}}}))
    with pytest.raises(ConfigError) as err:
        load_section(p, "train", TrainConfig)
    msg = str(err.value)
    assert "train.lr" in msg and "greater than 0" in msg
    p.write_text(yaml.safe_dump({"train": {"corpus": ["x"], "output_dir": "o", "bacth_size": 3}}))
    with pytest.raises(ConfigError, match="train.bacth_size"):
        load_section(p, "train", TrainConfig)
    with pytest.raises(ConfigError, match="missing section 'train'"):
        p.write_text("other: {}\n")
        load_section(p, "train", TrainConfig)


def test_llama_family_trains_and_gives_keys(tmp_path, corpus_dir):
    """The Llama config path trains, reloads, and kNN keys (decoder output == output-layer input) work."""
    from silo.datastore.keys import KeyExtractor, OutputInputCapture, decoder_matches_head_input

    cfg = validate(TrainConfig, tiny_train_config([corpus_dir / "train.jsonl"], tmp_path / "llama", max_steps=4,
                                                  eval_every=4, save_every=4,
                                                  model={"family": "llama", "hidden_size": 64, "num_layers": 1,
                                                         "num_heads": 4, "intermediate_size": 128,
                                                         "context_length": 64}, seq_len=64))
    train(cfg, progress=False)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert decoder_matches_head_input(model)
    ex = KeyExtractor(model, tok, window=64, stride=48)
    dk = next(ex.iter_documents(["In the beginning God created the heavens and the earth. " * 4]))
    assert dk.keys.shape == (len(dk.next_tokens), 64)
    # the fast path (decoder only) gives the same keys as the forward pre-hook on the output layer
    ids = torch.tensor([[tok.eos_token_id] + tok("In the beginning God", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode(), OutputInputCapture(model) as cap:
        model(input_ids=ids)
    assert torch.allclose(cap.value[0, :5].float(), torch.from_numpy(dk.keys[:5]), atol=1e-4)
