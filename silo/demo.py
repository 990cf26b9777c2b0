"""The embedded default, end to end, offline on a CPU: `silo demo --config configs/demo.yaml`.

Steps (each reuses its output when it is already up to date, so a second run is quick):
  1. the shipped, licence-tagged demo corpus (rebuilt from packages only if missing);
  2. the permissive-only LM (policy PDSW) and a reference LM trained on everything;
  3. the kNN datastore of the higher-risk text, one shard per owner;
  4. the evaluation table: parametric, kNN-LM, reference, gap closed;
  5. one completion of a passage quoted from a play in the store, with per-sentence sources.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from silo.training.config import load_section, read_yaml


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 76 - len(text)), flush=True)


def _model_up_to_date(cfg) -> bool:
    prov = Path(cfg.output_dir) / "provenance.json"
    if not prov.exists():
        return False
    try:
        return json.loads(prov.read_text()).get("config") == json.loads(cfg.model_dump_json())
    except (OSError, json.JSONDecodeError):
        return False


def _store_up_to_date(cfg) -> bool:
    from silo.datastore.store import read_manifest

    try:
        manifest = read_manifest(Path(cfg.output_dir))
        prov = json.loads((Path(cfg.model) / "provenance.json").read_text())
    except Exception:
        return False
    return (manifest["model"]["fingerprint"] == prov.get("fingerprint")
            and manifest["index"]["factory"] == cfg.index.factory
            and manifest["build"]["window"] == cfg.window and manifest["build"]["stride"] == cfg.stride)


def demo_prompt(config: str) -> tuple[str, str]:
    """A passage from the datastore's first play: (prompt, document id)."""
    from silo.training.corpus import load_documents
    from silo.datastore.store import DatastoreConfig

    ds = load_section(config, "datastore", DatastoreConfig)
    data = read_yaml(config).get("demo") or {}
    want = data.get("prompt_document")
    docs = [d for d in load_documents(ds.corpus, ds.domains) if d.domain == "shakespeare"]
    doc = next((d for d in docs if d.id == want), docs[0] if docs else None)
    if doc is None:
        return "The meaning of the word", ""
    text = doc.text
    start = text.find("\n", len(text) // 3) + 1
    return text[start:start + int(data.get("prompt_chars", 160))], doc.id


def run_demo(config: str, retrain: bool = False) -> int:
    from silo.cli import print_attributed
    from silo.datastore.store import DatastoreConfig, build_datastore
    from silo.evaluate import EvalConfig, evaluate, markdown_table
    from silo.knn import KNNConfig
    from silo.lm import SiloLM
    from silo.training.corpus import DEMO_DATA_DIR, load_documents
    from silo.training.train import TrainConfig, train

    t_all = time.time()
    _banner("1. licence-tagged demo corpus")
    if not (DEMO_DATA_DIR / "train.jsonl.gz").exists():
        from silo.training.demo_corpus import build_demo_corpus

        build_demo_corpus(DEMO_DATA_DIR, Path("~/.cache/silo/corpus-src").expanduser())
    from silo.cli import _corpus_table

    for split in ("train", "datastore"):
        print(f"[{split}]")
        print(_corpus_table(load_documents(f"pkg:demo/{split}")))

    sections = read_yaml(config)
    for section, title in (("train", "2a. permissive-only LM (weights see pd + sw text only)"),
                           ("reference", "2b. reference LM trained on everything (stands in for Pythia)")):
        if section not in sections:
            continue
        _banner(title)
        cfg = load_section(config, section, TrainConfig)
        if _model_up_to_date(cfg) and not retrain:
            print(f"up to date: {cfg.output_dir} (pass --retrain to train again)")
        else:
            prov = train(cfg, config_source=f"{config}#{section}")
            s = prov["summary"]
            print(f"{cfg.output_dir}: {s['parameters'] / 1e6:.2f}M parameters, {s['kept_documents']} documents "
                  f"({s['kept_by_tier']}), {s['tokens_per_second']:,.0f} tokens/s")

    _banner("3. kNN datastore of the higher-risk text (one shard per owner)")
    dcfg = load_section(config, "datastore", DatastoreConfig)
    if _store_up_to_date(dcfg) and not retrain:
        print(f"up to date: {dcfg.output_dir}")
    else:
        dcfg.overwrite = True
        build_datastore(dcfg, config_source=config)

    _banner("4. held-out perplexity per domain")
    ecfg = load_section(config, "eval", EvalConfig)
    out = evaluate(ecfg)
    print(markdown_table(out))
    print(f"(tables in {ecfg.output_dir}/results.md and results.json)")

    _banner("5. an attributed completion")
    knn = load_section(config, "knn", KNNConfig) if "knn" in sections else KNNConfig()
    lm = SiloLM.load(dcfg.model, dcfg.output_dir, knn=knn)
    prompt, doc_id = demo_prompt(config)
    print(f"prompt (quoted from {doc_id}):\n{prompt}\u2502")
    comp = lm.complete(prompt, max_new_tokens=48, temperature=0.0, stop=())
    print("completion:")
    print_attributed(comp)
    print(f"\ndemo finished in {time.time() - t_all:.0f}s")
    return 0
