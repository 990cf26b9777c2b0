"""Shared fixtures: a tiny real corpus, a tiny real model trained on it, and a real datastore.

Everything is built once per test session in a temporary folder; nothing is mocked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(2)

from silo.core.corpus import load_documents, write_jsonl  # noqa: E402

TINY_MODEL = {"family": "gpt_neox", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
              "intermediate_size": 256, "context_length": 128}


def tiny_train_config(corpus, output_dir, **over) -> dict:
    cfg = dict(corpus=[str(c) for c in corpus], output_dir=str(output_dir), tokenizer={"vocab_size": 600},
               model=TINY_MODEL, seq_len=128, batch_size=8, max_steps=60, lr=3e-3, warmup_steps=5,
               eval_every=30, save_every=30, eval_tokens=4096, seed=0)
    cfg.update(over)
    return cfg


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A small slice of the shipped demo corpus: permissive training text and two datastore owners."""
    d = tmp_path_factory.mktemp("corpus")
    train = [doc for doc in load_documents("pkg:demo/train") if doc.domain in ("bible", "python")]
    train = sorted(train, key=lambda x: x.id)[:40]
    for doc in train:
        doc.text = doc.text[:6000]
    write_jsonl(train, d / "train.jsonl")
    store_docs = load_documents("pkg:demo/datastore")
    plays = sorted([x for x in store_docs if x.domain == "shakespeare"], key=lambda x: x.id)[:3]
    gcide = sorted([x for x in store_docs if x.domain == "gcide"], key=lambda x: x.id)[:2]
    for doc in plays + gcide:
        doc.text = doc.text[:12000]
    write_jsonl(plays + gcide, d / "datastore.jsonl")
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, corpus_dir) -> Path:
    from silo.core.config import validate
    from silo.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("model") / "model"
    cfg = validate(TrainConfig, tiny_train_config([corpus_dir / "train.jsonl"], out,
                                                  eval_corpus=[str(corpus_dir / "train.jsonl")]))
    train(cfg, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model, corpus_dir) -> Path:
    from silo.datastore.build import DatastoreConfig, build_datastore
    from silo.core.config import validate

    out = tmp_path_factory.mktemp("store") / "store"
    cfg = validate(DatastoreConfig, dict(model=str(tiny_model), corpus=[str(corpus_dir / "datastore.jsonl")],
                                         output_dir=str(out), window=128, stride=96, batch_size=16))
    build_datastore(cfg, progress=False)
    return out


def write_docs(path: Path, docs: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    return path


def lock_waiters(path: Path) -> int:
    """How many flock() calls are blocked on `path` right now (Linux /proc/locks: a waiter's line has
    '->' before the lock type and the file's device:inode)."""
    inode = os.stat(path).st_ino
    with open("/proc/locks", encoding="ascii") as fh:
        return sum(1 for line in fh if " -> " in line and line.split()[-3].endswith(f":{inode}"))


def wait_for_lock_waiter(path: Path, timeout: float = 60.0) -> None:
    """Return once some thread or process is blocked waiting for the flock on `path`."""
    import time

    end = time.monotonic() + timeout
    while lock_waiters(path) == 0:
        if time.monotonic() > end:
            raise AssertionError(f"nothing waited for the lock on {path} within {timeout:.0f}s")
        time.sleep(0.01)


def start_server(model: Path, store: Path | None, **cfg):
    """A real server over `model` (and `store`): gRPC and the HTTP door on free ports, one engine; the
    caller stops it."""
    from silo.model.lm import SiloLM
    from silo.serving.config import ServeConfig
    from silo.serving.server import SiloServer

    config = ServeConfig(model=str(model), store=str(store) if store else None, port=0, http_port=0, **cfg)
    return SiloServer(config, lm=SiloLM.load(str(model), str(store) if store else None)).start()


def openai_client(server, timeout: float = 120):
    """The official openai client on `server`'s HTTP door (no retries: a test sees every refusal)."""
    import openai

    return openai.OpenAI(base_url=server.http.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
