"""The gate on a store it was not made for (not a test: one run, figures for the record).

Builds a second store from the shipped manuals corpus (pkg:manuals: a puzzle collection's manual and the
SQLite documentation, two owners) with the demo's model, fits its gate the way a user would, on that
corpus's own validation split only (text of the store's kinds that it does not hold; nothing else), and
prints:
  * the evaluation table (test split, 4,000 tokens per domain): the manuals' test split (text of the
    store's kinds) and the demo's python and bible test splits (text the store does not hold at all);
    parametric, the fixed lambda tuned per domain on validation, the served gate;
  * served / parametric where the store holds nothing relevant (target <= 1.02), and the share of the
    tuned fixed lambda's log-gain the served gate keeps on the store's kinds (target >= 90%);
  * after the puzzles' owner opts out (an in-memory snapshot without the owner's shards, the gate NOT
    re-fitted): served / parametric on the puzzles' test text (target <= 1.05).

    .venv/bin/python benchmarks/gate_transfer_bench.py [--model runs/demo/model] [--out runs/manuals]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from silo.core.config import validate
from silo.core.corpus import load_documents
from silo.datastore.build import DatastoreConfig, build_datastore
from silo.model.lm import SiloLM
from silo.research.snapshots import without_owners
from silo.workflows.evaluate import EvalConfig, domain_texts, evaluate, markdown_table
from silo.workflows.gate_fit import GateConfig, fit_store_gate

HOLDS = ("puzzles", "sqlite")  # the store's kinds
LACKS = ("python", "bible")  # text it does not hold


def ppl(x) -> float:
    return math.exp(-float(np.mean(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--out", default="runs/manuals")
    ap.add_argument("--factory", default="IVF256,SQ8", help="the store's FAISS index (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=4000)
    args = ap.parse_args()
    out = Path(args.out)
    store = out / "store"
    if not store.exists():
        build_datastore(validate(DatastoreConfig, dict(
            model=args.model, corpus=["pkg:manuals/datastore"], output_dir=str(store), shard_by="owner",
            index={"factory": args.factory, "nprobe": 16}, window=256, stride=192, batch_size=16)))
    gate, report = fit_store_gate(GateConfig(model=args.model, store=str(store), val=["pkg:manuals/val"],
                                             max_tokens=args.tokens))
    print(json.dumps({"mode": gate.mode, "k": gate.k, "tau_ref": gate.tau_ref, "validation": report["domains"],
                      "check": report["check"]}, indent=1, default=str))
    res = evaluate(EvalConfig(model=args.model, store=str(store), val=["pkg:manuals/val", "pkg:demo/val"],
                              test=["pkg:manuals/test", "pkg:demo/test"], domains=list(HOLDS + LACKS),
                              max_tokens=args.tokens, gate="store", output_dir=str(out / "eval"),
                              ric={"enabled": False}), progress=False)
    print(markdown_table(res))
    rows = {r.domain: r for r in res.domains}
    for d in LACKS:
        print(f"{d}: served / parametric = {rows[d].knn_gated / rows[d].parametric:.3f} (target <= 1.02)")
    for d in HOLDS:
        r = rows[d]
        share = math.log(r.parametric / r.knn_gated) / math.log(r.parametric / r.knn)
        print(f"{d}: served keeps {share:.0%} of the tuned fixed lambda's log-gain (parametric {r.parametric:.2f}, "
              f"fixed {r.knn:.2f}, served {r.knn_gated:.2f}; target >= 90%)")
    lm = SiloLM.load(args.model, str(store))
    after = lm.retriever("knn", store=without_owners(lm.store, {"sgt-puzzles"}))
    for d in HOLDS:
        pos = lm.collect(domain_texts(load_documents("pkg:manuals/test", [d]), args.tokens)[d]).truncate(args.tokens)
        print(f"after the sgt-puzzles owner opts out (no re-fit): {d} served / parametric = "
              f"{ppl(after.mix_targets(pos)) / ppl(pos.logp_lm):.3f}" + (" (target <= 1.05)" if d == "puzzles" else ""))


if __name__ == "__main__":
    main()
