"""The embedded default, end to end, offline on a CPU: `silo demo --config configs/demo.yaml`.

Steps (each reuses its output when it is already up to date, so a second run is quick):
  1. the shipped, licence-tagged demo corpus (rebuilt from packages only if missing);
  2. the permissive-only LM (policy PDSW) and a reference LM trained on everything;
  3. the kNN datastore of the higher-risk text, one shard per owner, and its mixture gate;
  4. the evaluation table: parametric, kNN-LM (fixed lambda and gated), reference, gap closed;
  5. one completion of a passage quoted from a play in the store, with per-sentence sources;
  6. the play's owner opts out: receipt, held-out perplexity before and after (no re-tuning).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from silo.core.config import load_section, read_yaml

if TYPE_CHECKING:
    from silo.datastore.removal_records import Receipt


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
    # nothing removed or reindexed since the build (the demo's opt-out step works on a copy; a rebuild
    # over an old store continues its generations, so the generation number alone cannot tell)
    removed = any((Path(cfg.output_dir) / "removals").glob("*")) or any(r.removed_docs for r in manifest.shards)
    return (manifest.model.fingerprint == prov.get("fingerprint") and not removed
            and manifest.index.factory == cfg.index.factory
            and manifest.build.get("config") == cfg.model_dump(exclude={"overwrite"}))


def _gate_up_to_date(gcfg):
    """The store's saved gate if it was fitted for this store's model and current build, else None."""
    from silo.datastore.format import Manifest
    from silo.model.gate import GATE_FORMAT, Gate

    try:
        gate = Gate.load(gcfg.store)
        manifest = Manifest.read(gcfg.store)
    except Exception:
        return None
    if (gate is None or gate.fingerprint != manifest.model.fingerprint or gate.fitted < manifest.created
            or gate.format != GATE_FORMAT):
        return None
    return gate


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
    from silo.workflows.gate_fit import GateConfig, fit_store_gate

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
    if "gate" in sections:
        _banner("3b. the mixture gate: lambda per token, fitted on validation text")
        gcfg = load_section(config, "gate", GateConfig)
        gate = _gate_up_to_date(gcfg)
        if gate is not None and not retrain:
            print(f"up to date: {gcfg.store}/gate.json (k={gate.k}, fitted {gate.fitted})")
        else:
            gate, report = fit_store_gate(gcfg)
        print("validation perplexity, parametric -> gated (mean lambda): " + "; ".join(
            f"{d} {r['parametric']:.1f} -> {r['gated']:.1f} ({r['lambda_mean']:.2f})"
            for d, r in gate.report["domains"].items()))

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
    from silo.core.corpus import load_documents
    from silo.serving.client import SiloClient

    prompt, doc_id = demo_prompt(config)
    owner = doc_id.split("/")[0] if doc_id else ""
    server, served, owner_token = _start_server(config, dcfg, owner)
    try:
        with SiloClient(server.target, timeout=600) as client:
            gen = dict(max_tokens=40, temperature=0.0, return_attributions=True)
            print(f"prompt (quoted from {doc_id}):\n{prompt}\u2502")
            before = client.complete(prompt, **gen)
            print("completion:")
            _print_response(before)

            for p in ("The for statement in Python is used to",):  # text the store does not hold
                for mode in ("knn", "parametric"):
                    r = client.complete(p, mode=mode, max_tokens=24, temperature=0.0)
                    print(f"{mode:>10}: {p}\u2502{r.text!r}")

            _banner(f"6. opt-out: owner '{owner}' removes its content through silo.v1.DataOwner")
            with SiloClient(server.target, token=owner_token, timeout=60) as as_owner:  # the public sees counts only
                look = as_owner.lookup(document_id=doc_id)
            print(f"lookup {doc_id} (as its owner): in store = {look.in_store}, {look.entries:,} entries in "
                  f"{', '.join(look.shards) or '-'}")
            test = {}
            for d in load_documents("pkg:demo/test"):
                test.setdefault(d.domain, d.text)
            tuned = tuned or {}

            def score(dom):  # (served mixture, fixed lambda tuned for the domain in step 4)
                s = tuned.get(dom) or {}
                text = test[dom][:6000]
                return client.score(text), client.score(text, k=s.get("k"), lmbda=s.get("lmbda"),
                                                        tau=s.get("tau"))

            ppl_before = {dom: score(dom) for dom in test}
            with SiloClient(server.target, token=owner_token, timeout=900) as data_owner:
                status = data_owner.submit_removal(owner=owner, requester=f"{owner} (rights holder)",
                                                   reason="opt-out from the datastore", wait=True)
                receipt = data_owner.get_receipt(status.request_id)
            _print_receipt(status, receipt, served)
            look = client.lookup(document_id=doc_id)
            print(f"lookup {doc_id}: in store = {look.in_store}")
            _print_optout_table(test, ppl_before, {dom: score(dom) for dom in test})
            print("\nthe same completion after the opt-out:")
            _print_response(client.complete(prompt, **gen))
    finally:
        server.drain(5.0)
        print("server drained and stopped")


def _start_server(config: str, dcfg, owner: str):
    """A server over a copy of the built store (the opt-out edits the copy; the built store stays whole),
    with fresh admin and owner tokens: (server, the copy's folder, the owner's token)."""
    import secrets
    import shutil

    from silo.serving.config import load_serve_config
    from silo.serving.server import SiloServer

    served = Path(dcfg.output_dir).with_name(Path(dcfg.output_dir).name + "-served")
    if served.exists():
        shutil.rmtree(served)
    shutil.copytree(dcfg.output_dir, served)
    admin, owner_token = secrets.token_hex(16), secrets.token_hex(16)
    cfg = load_serve_config(config, {"port": 0, "http_port": 0, "store": str(served), "metrics_port": None,
                                     "admin_token": admin, "admin_token_env": None,
                                     "owner_tokens": {owner: owner_token}})
    server = SiloServer(cfg).start()
    print(f"silo serve listening on {server.target} (health SERVING, store generation "
          f"{server.engine.lm.store.generation})")
    if server.http is not None:
        print(f"  OpenAI-compatible API: {server.http.url}/v1 (completions, chat/completions, models); "
              f"health: {server.http.url}/health\n  data owners' page: {server.http.url}/owner")
    return server, served, owner_token


def _print_receipt(status, receipt: Receipt, served: Path) -> None:
    """The removal's outcome: counts, generations and what the verification found."""
    v = receipt.verification or {}
    print(f"request {status.request_id}: status {status.status}; removed {receipt.removed.entries:,} "
          f"entries; generation {receipt.generations.before} -> {receipt.generations.current}")
    if v:
        vb = v.get("verbatim") or {}
        print(f"verification passed: {v.get('passed')}; probe hits before/after: "
              f"{v['probe']['before']['hits']}/{v['probe']['after']['hits']}; verbatim ROUGE-L "
              f"before/after/parametric: {vb.get('before', {}).get('rouge_l', 'n/a')}/"
              f"{vb.get('after', {}).get('rouge_l', 'n/a')}/{vb.get('parametric', {}).get('rouge_l', 'n/a')}")
        pp = v.get("perplexity") or {}
        print(f"perplexity of the removed text (served mixture: {v.get('knn', {}).get('mixture')}) "
              f"before/after/parametric: {pp.get('before')}/{pp.get('after')}/{pp.get('parametric')}")
    print(f"receipt: {served}/receipts/{status.request_id}.json; journal: {served}/journal.jsonl")


def _print_optout_table(test: dict[str, str], before: dict, after: dict) -> None:
    """Held-out perplexity per domain before and after the opt-out: ({domain: (served, fixed λ)})."""
    print("\nheld-out perplexity (test split, first 6,000 characters per domain) before and after the opt-out, "
          "no re-tuning; the served (gated) mixture and the fixed lambda tuned per domain in step 4:")
    print("| domain | parametric | served before | served after | after / parametric | fixed λ before | fixed λ after |")
    print("|---|---|---|---|---|---|---|")
    for dom in test:
        (gb, fb), (ga, fa) = before[dom], after[dom]
        print(f"| {dom} | {ga.perplexity_parametric:.2f} | {gb.perplexity:.2f} | {ga.perplexity:.2f} | "
              f"{ga.perplexity / ga.perplexity_parametric:.3f} | {fb.perplexity:.2f} | {fa.perplexity:.2f} |")


def cmd_demo(args) -> int:
    return run_demo(args.config, retrain=args.retrain)


def register(sub) -> None:
    m = sub.add_parser("demo", help="the embedded default: corpus -> LM -> datastore -> eval -> attributed generation")
    m.add_argument("--config", default="configs/demo.yaml")
    m.add_argument("--retrain", action="store_true", help="train the models again even if up to date")
    m.set_defaults(func=cmd_demo)
