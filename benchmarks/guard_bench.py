"""The verbatim guard on the demo: does a cap hold, and what does it cost where nothing is copied?

    python benchmarks/guard_bench.py --config configs/demo.yaml            # after the demo (runs/demo/...)

1. The demo's prompt (a passage quoted from Coriolanus, `demo_prompt`) completed greedily and with
   `--samples` sampled completions (temperature `--temperature`, seeds 0..n-1), without an output policy
   and with the quoted play's licence tier capped at `--cap` characters. For each completion: the exact
   longest verbatim span against EVERY store document (longest common substring, measured here
   independently of the guard), guard events, seconds.
2. Perplexity of each test domain (the first `--ppl-tokens` tokens of the domain's first test document)
   under the served mixture, teacher-forced through the generation path, with the guard off and on (the
   same cap): the guard changes nothing where the text does not repeat the store past the cap.

Prints markdown tables and writes JSON (`--out`). Uses the `lm` and `knn` sections of the config.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from silo.cli.demo import demo_prompt  # noqa: E402
from silo.core.config import load_section, read_yaml  # noqa: E402
from silo.core.corpus import load_documents  # noqa: E402
from silo.core.licenses import tier_of  # noqa: E402
from silo.model.knn import KNNConfig  # noqa: E402
from silo.model.lm import SiloLM  # noqa: E402
from silo.model.output_policy import OutputPolicy  # noqa: E402
from silo.model.sampling import SamplingParams  # noqa: E402
from silo.model.verbatim import SuffixMatch  # noqa: E402


def longest_verbatim(text: str, docs: list[tuple[str, str]]) -> tuple[int, str]:
    """Exact longest common substring of `text` with any document: (length, document id)."""
    best = (0, "")
    for doc_id, doc in docs:
        m = SuffixMatch(doc)
        m.feed(text, 0)
        best = max(best, (m.best, doc_id))
    return best


def completions(lm, prompt, policy, docs, args) -> list[dict]:
    out = []
    runs = [("greedy", SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0))]
    runs += [(f"seed {s}", SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, seed=s))
             for s in range(args.samples)]
    for name, sampling in runs:
        t0 = time.time()
        comp = lm.complete(prompt, sampling, lm.retriever("knn"), attribute=False, policy=policy)
        secs = time.time() - t0
        n, doc_id = longest_verbatim(comp.text, docs)
        out.append({"run": name, "longest_verbatim": n, "document": doc_id, "tokens": len(comp.tokens),
                    "guard_events": len(comp.guard_events), "seconds": round(secs, 2), "text": comp.text})
        print(f"  {name:>8}: longest verbatim {n:4d} ({doc_id}), {len(comp.guard_events)} guard event(s), "
              f"{secs:.1f}s", flush=True)
    return out


@torch.inference_mode()
def teacher_forced(lm, text: str, policy: OutputPolicy, max_tokens: int) -> dict:
    """log p of each token of `text` under the served mixture through the generation step (KV cache, one
    token at a time), guard off and on; windows of the model's context, later ones scoring their second
    half (as `SiloLM.collect`)."""
    ids = [lm.tokenizer.eos_token_id] + lm.encode(text)[:max_tokens]
    window = lm.context_length - 1
    stride = window // 2
    off, on, acted, blocked = [], [], 0, 0
    begin, first_new = 0, 0
    while first_new < len(ids) - 1:
        end = min(begin + window, len(ids) - 1)
        retriever = lm.retriever("knn")
        guard = lm.guard(retriever, policy)
        prefix = ids[begin:first_new + 1]
        hidden, logits, past = lm.forward(torch.tensor([prefix]), past=lm._new_cache())
        state_off = retriever.begin(hidden[0].numpy(), torch.log_softmax(logits[0].double(), -1), prefix)
        state_on = retriever.begin(hidden[0].numpy(), torch.log_softmax(logits[0].double(), -1), prefix)
        scored: list[int] = []
        for t in range(first_new, end):
            target = ids[t + 1]
            key = hidden[0, -1:].numpy()
            logp_lm = torch.log_softmax(logits[0, -1].double(), -1)
            p_off, rows_off = retriever.next_token(key, logp_lm[None], [state_off])
            exclude = guard.exclude()
            if len(exclude):
                acted += 1
                p_on, rows_on = retriever.next_token(key, logp_lm[None], [state_on], exclude=[exclude])
            else:
                p_on, rows_on = p_off, rows_off
            p_on = guard.adjust(p_on[0])
            off.append(math.log(max(float(p_off[0, target]), 1e-12)))
            on.append(math.log(max(float(p_on[target]), 1e-12)))
            blocked += float(p_on[target]) == 0.0
            retriever.observe(rows_off[0], target, logp_lm, state_off)
            retriever.observe(rows_on[0], target, logp_lm, state_on)
            scored.append(target)
            guard.observe(lm.tokenizer.decode(scored), retriever.documents(rows_on[0]))
            hidden, logits, past = lm.forward(torch.tensor([[target]]), past=past)
        if end >= len(ids) - 1:
            break
        begin = end - (window - stride)
        first_new = end
    return {"tokens": len(off), "ppl_off": math.exp(-np.mean(off)), "ppl_on": math.exp(-np.mean(on)),
            "steps_guard_acted": acted, "tokens_blocked": int(blocked)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", help="default: the config's lm.model")
    ap.add_argument("--store", help="default: the config's lm.store")
    ap.add_argument("--cap", type=int, default=80, help="max_verbatim_chars of the quoted play's tier")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=300, help="tokens scored per test domain (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/bench/guard.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = read_yaml(args.config)
    lm_sec = data.get("lm") or {}
    knn = load_section(args.config, "knn", KNNConfig) if "knn" in data else KNNConfig()
    lm = SiloLM.load(args.model or lm_sec["model"], args.store or lm_sec["store"], knn=knn)
    prompt, doc_id = demo_prompt(args.config)
    doc = next(d for sh in lm.store.shards for d in sh.documents if d.id == doc_id)
    tier = tier_of(doc.license)
    policy = OutputPolicy.model_validate({"tiers": {tier: {"max_verbatim_chars": args.cap}}})
    docs = [(d.id, d.text) for sh in lm.store.shards for d in sh.live_documents()]
    print(f"prompt ({doc_id}, licence {doc.license} -> tier {tier}): {prompt!r}")
    print(f"store: {lm.store.path}, {len(docs)} documents, {sum(len(t) for _, t in docs):,} characters; "
          f"mixture {lm.retriever('knn').mixture.kind} k={lm.retriever('knn').k}", flush=True)

    result = {"config": vars(args), "prompt": prompt, "document": doc_id, "tier": tier}
    for name, pol in (("uncapped", None), (f"capped at {args.cap}", policy)):
        print(f"\n{name}:", flush=True)
        result[name] = completions(lm, prompt, pol, docs, args)

    print(f"\n| completions of the demo prompt | greedy | sampled (T={args.temperature}, n={args.samples}): "
          "max | mean | over the cap | guard events | s/completion |")
    print("|---|---|---|---|---|---|---|")
    for name in ("uncapped", f"capped at {args.cap}"):
        rows = result[name]
        sampled = [r["longest_verbatim"] for r in rows[1:]]
        print(f"| {name} | {rows[0]['longest_verbatim']} | {max(sampled)} | {np.mean(sampled):.1f} | "
              f"{sum(x > args.cap for x in sampled)}/{len(sampled)} | {sum(r['guard_events'] for r in rows)} | "
              f"{np.mean([r['seconds'] for r in rows]):.1f} |")

    if args.ppl_tokens:
        print(f"\nperplexity per test domain, first {args.ppl_tokens} tokens, guard off vs on (cap {args.cap} "
              f"for tier {tier}):", flush=True)
        test: dict[str, str] = {}
        for d in load_documents("pkg:demo/test"):
            test.setdefault(d.domain, d.text)
        result["perplexity"] = {}
        for dom, text in test.items():
            t0 = time.time()
            r = teacher_forced(lm, text, policy, args.ppl_tokens)
            r["seconds"] = round(time.time() - t0, 1)
            result["perplexity"][dom] = r
            print(f"  {dom}: {r}", flush=True)
        print("\n| domain | tokens | guard off | guard on | steps the guard acted | tokens blocked |")
        print("|---|---|---|---|---|---|")
        for dom, r in result["perplexity"].items():
            print(f"| {dom} | {r['tokens']} | {r['ppl_off']:.3f} | {r['ppl_on']:.3f} | {r['steps_guard_acted']} | "
                  f"{r['tokens_blocked']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
