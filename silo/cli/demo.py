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

from silo.core.config import load_section, read_yaml


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
    from silo.datastore.format import Manifest

    try:
        manifest = Manifest.read(Path(cfg.output_dir))
        prov = json.loads((Path(cfg.model) / "provenance.json").read_text())
    except Exception:
        return False
    # generation 1 = nothing removed since the build (the demo's opt-out step removes an owner)
    return (manifest.model.fingerprint == prov.get("fingerprint") and manifest.generation == 1
            and manifest.build.get("config") == cfg.model_dump(exclude={"overwrite"}))


def demo_prompt(config: str) -> tuple[str, str]:
    """A passage quoted from a play in the datastore: (prompt, document id).

    The quote starts at a line and stops mid-line (at a space): a tiny LM's keys identify a passage by
    its last few tokens, so a quote that ends inside a line lets kNN-LM carry on the play's own words.
    """
    from silo.core.corpus import load_documents
    from silo.datastore.build import DatastoreConfig

    ds = load_section(config, "datastore", DatastoreConfig)
    data = read_yaml(config).get("demo") or {}
    want = data.get("prompt_document")
    docs = [d for d in load_documents(ds.corpus, ds.domains) if d.domain == "shakespeare"]
    doc = next((d for d in docs if d.id == want), docs[0] if docs else None)
    if doc is None:
        return "The meaning of the word", ""
    text = doc.text
    start = text.find("\n", int(len(text) * float(data.get("prompt_at", 0.3)))) + 1
    quote = text[start:start + int(data.get("prompt_chars", 200))]
    return quote[: quote.rfind(" ")], doc.id


def run_demo(config: str, retrain: bool = False) -> int:
    from silo.core.corpus import DEMO_DATA_DIR, load_documents
    from silo.datastore.build import DatastoreConfig, build_datastore
    from silo.training.train import TrainConfig, train
    from silo.workflows.evaluate import EvalConfig, evaluate, markdown_table

    from .corpus import corpus_table

    t_all = time.time()
    _banner("1. licence-tagged demo corpus")
    if not (DEMO_DATA_DIR / "train.jsonl.gz").exists():
        from silo.demo_corpus import build_demo_corpus

        build_demo_corpus(DEMO_DATA_DIR, Path("~/.cache/silo/corpus-src").expanduser())
    for split in ("train", "datastore"):
        print(f"[{split}]")
        print(corpus_table(load_documents(f"pkg:demo/{split}")))

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

    _banner("5. the gRPC backend: a completion with per-sentence sources")
    run_serving_demo(config, dcfg, ecfg, tuned={r.domain: r.knn_settings for r in out.domains})
    print(f"\ndemo finished in {time.time() - t_all:.0f}s")
    return 0


def _print_response(resp) -> None:
    """Print a silo.v1 CompleteResponse with its attributions."""
    print(resp.text)
    print(f"\n[finish: {resp.finish_reason}; {resp.usage.prompt_tokens} prompt + {resp.usage.completion_tokens} "
          f"completion tokens; store generation {resp.store_generation}]")
    for i, a in enumerate(resp.attributions, 1):
        print(f"  sentence {i}: {a.sentence!r}")
        print(f"    parametric model alone: {100 * a.parametric_share:.0f}%")
        for src in a.sources[:3]:
            print(f"    {100 * src.share:4.0f}%  {src.owner} / {src.document_id} ({src.title}; {src.license})")
            print(f"          supporting: {src.sentence[:120]!r}")


def run_serving_demo(config: str, dcfg, ecfg, tuned: dict | None = None) -> None:
    """Serve a copy of the store over gRPC, complete a quoted passage, let its owner opt out, compare.

    `ecfg` is the eval config of step 4 and `tuned` its per-domain kNN settings."""
    import secrets
    import shutil

    from silo.core.corpus import load_documents
    from silo.serving.client import SiloClient
    from silo.serving.config import load_serve_config
    from silo.serving.server import SiloServer

    prompt, doc_id = demo_prompt(config)
    owner = doc_id.split("/")[0] if doc_id else ""
    served = Path(dcfg.output_dir).with_name(Path(dcfg.output_dir).name + "-served")
    if served.exists():
        shutil.rmtree(served)
    shutil.copytree(dcfg.output_dir, served)  # the opt-out below edits this copy; the built store stays whole
    admin, owner_token = secrets.token_hex(16), secrets.token_hex(16)
    cfg = load_serve_config(config, {"port": 0, "store": str(served), "metrics_port": None,
                                     "admin_token": admin, "admin_token_env": None,
                                     "owner_tokens": {owner: owner_token}})
    server = SiloServer(cfg).start()
    print(f"silo serve listening on {server.target} (health SERVING, store generation 1)")
    try:
        with SiloClient(server.target, timeout=600) as client:
            gen = dict(max_tokens=40, temperature=0.0, return_attributions=True)
            print(f"prompt (quoted from {doc_id}):\n{prompt}\u2502")
            before = client.complete(prompt, **gen)
            print("completion:")
            _print_response(before)

            _banner(f"6. opt-out: owner '{owner}' removes its content through silo.v1.DataOwner")
            look = client.lookup(document_id=doc_id)
            print(f"lookup {doc_id}: in store = {look.in_store}, {look.entries:,} entries in {list(look.shards)}")
            test = {d.domain: d.text for d in load_documents("pkg:demo/test", ["shakespeare", "gcide"])}
            tuned = tuned or {}

            def score(dom):  # each domain with the kNN settings tuned for it on validation (step 4)
                s = tuned.get(dom) or {}
                return client.score(test[dom][:6000], k=s.get("k"), lmbda=s.get("lmbda"), tau=s.get("temperature"))

            ppl_before = {dom: score(dom) for dom in test}
            with SiloClient(server.target, token=owner_token, timeout=900) as data_owner:
                status = data_owner.submit_removal(owner=owner, requester=f"{owner} (rights holder)",
                                                   reason="opt-out from the datastore", wait=True)
                receipt = data_owner.get_receipt(status.request_id)
            v = receipt.get("verification") or {}
            print(f"request {status.request_id}: status {status.status}; removed {receipt['removed']['entries']:,} "
                  f"entries; generation {receipt['generations']['before']} -> {receipt['generations']['current']}")
            if v:
                vb = v.get("verbatim") or {}
                print(f"verification passed: {v.get('passed')}; probe hits before/after: "
                      f"{v['probe']['before']['hits']}/{v['probe']['after']['hits']}; verbatim ROUGE-L "
                      f"before/after/parametric: {vb.get('before', {}).get('rouge_l', 'n/a')}/"
                      f"{vb.get('after', {}).get('rouge_l', 'n/a')}/{vb.get('parametric', {}).get('rouge_l', 'n/a')}")
                pp = v.get("perplexity") or {}
                print(f"perplexity of the removed text (serving kNN settings) before/after/parametric: "
                      f"{pp.get('before')}/{pp.get('after')}/{pp.get('parametric')}")
            print(f"receipt: {served}/receipts/{status.request_id}.json; journal: {served}/journal.jsonl")
            look = client.lookup(document_id=doc_id)
            print(f"lookup {doc_id}: in store = {look.in_store}")
            after = {dom: score(dom) for dom in test}
            # SILO's protocol tunes k/lambda/tau on validation for the store being evaluated: re-tune for
            # the store as it is after the opt-out (a lambda fitted to the owner's text no longer fits).
            from silo.workflows.evaluate import evaluate

            after_cfg = ecfg.model_copy(update={
                "store": str(served), "reference_model": None, "domains": list(test),
                "output_dir": str(Path(ecfg.output_dir).with_name("eval-after-optout"))})
            retuned = {r.domain: r for r in evaluate(after_cfg, progress=False).domains}
            print("\nheld-out perplexity (test split) before and after the opt-out; kNN settings tuned per domain "
                  "on validation (step 4), then re-tuned for the store after the opt-out:")
            print("| domain | parametric | kNN-LM before | after, same settings | after, re-tuned (λ; its parametric) |")
            print("|---|---|---|---|---|")
            nan = float("nan")
            for dom in test:
                r = retuned.get(dom)
                print(f"| {dom} | {after[dom].perplexity_parametric:.2f} | {ppl_before[dom].perplexity:.2f} | "
                      f"{after[dom].perplexity:.2f} | {r.knn if r and r.knn is not None else nan:.2f} "
                      f"(λ {(r.knn_settings or {}).get('lmbda', nan) if r else nan:.2f}; "
                      f"{r.parametric if r else nan:.2f} on its {r.tokens if r else 0} tokens) |")
            print("\nthe same completion after the opt-out:")
            _print_response(client.complete(prompt, **gen))
    finally:
        server.drain(5.0)
        print("server drained and stopped")


def cmd_demo(args) -> int:
    return run_demo(args.config, retrain=args.retrain)


def register(sub) -> None:
    m = sub.add_parser("demo", help="the embedded default: corpus -> LM -> datastore -> eval -> attributed generation")
    m.add_argument("--config", default="configs/demo.yaml")
    m.add_argument("--retrain", action="store_true", help="train the models again even if up to date")
    m.set_defaults(func=cmd_demo)
