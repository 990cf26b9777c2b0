"""The gate fit's final check, and the named weaker mixtures it falls back to.

A fitted gate is saved only if, per validation domain (and on the text the LM wrote itself), it is not
worse than the LM alone by more than a tolerance, and overall not worse than the fixed lambda fitted
beside it: on HELD-OUT positions (the gate fitted on one half, judged on the other) and as served (the
final gate through the same retriever that scores and generates). Otherwise the fit either fails with the
domains and numbers, or falls back to the strongest fixed lambda that passes every domain (mode "fixed"),
or to the LM alone (mode "parametric"), and says so in gate.json, `silo datastore info` and `silo eval`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from silo.datastore.store import Neighbors
from silo.model.gate import Gate, SkipPredictor
from silo.model.knn import KNNRetriever, knn_target_logprob, mix_logp
from silo.model.types import PositionBatch

from .gate_data import LM_SAMPLES
from .mixture_fit import GateFitError

MIN_FIXED_LAMBDA = 0.005  # below this a fixed fallback is the LM alone
# text the LM wrote itself can only lose from any use of the store (its best lambda is 0): it is held to a
# looser bound, this many times the tolerance; a gate that treats text the store lacks as held still fails it
LM_SAMPLES_FACTOR = 3.0


def _ppl(lp: np.ndarray) -> float:
    return math.exp(-float(np.mean(lp))) if len(lp) else float("nan")


def held_out_rows(held: dict) -> dict[str, dict]:
    """Per domain of the held-out half: positions and perplexity under the LM, the fixed mixture and the gate."""
    labels = np.asarray(held["labels"])
    out = {}
    for dom in sorted(set(labels.tolist())):
        m = labels == dom
        out[dom] = {"positions": int(m.sum()), **{w: _ppl(np.asarray(held[w])[m]) for w in ("parametric", "fixed", "gated")}}
    out["(all)"] = {"positions": int(len(labels)), **{w: _ppl(np.asarray(held[w])) for w in ("parametric", "fixed", "gated")}}
    return out


def failures(held: dict[str, dict], served: dict[str, dict], tolerance: float) -> list[str]:
    """What the gate fails, each naming the domain and the numbers (empty: it passes)."""
    out = []
    for where, rows in (("held-out", held), ("served", served)):
        for dom, r in rows.items():
            g, p = r["gated"], r["parametric"]
            tol = LM_SAMPLES_FACTOR * tolerance if dom == LM_SAMPLES else tolerance
            if not math.isfinite(g):
                out.append(f"{dom} ({where}): the gate's perplexity is {g} (parametric {p:.2f})")
            elif dom != "(all)" and g > p * (1 + tol):
                out.append(f"{dom} ({where}): gated {g:.2f} > parametric {p:.2f} (+{tol:.0%} allowed)")
    a = held.get("(all)")
    if a and math.isfinite(a["gated"]) and a["gated"] > a["fixed"] * (1 + tolerance):
        out.append(f"all domains (held-out): gated {a['gated']:.2f} > fixed lambda {a['fixed']:.2f} "
                   f"(+{tolerance:.0%} allowed)")
    return out


def served_rows(lm, gate: Gate, nb: Neighbors, pos: PositionBatch, labels: np.ndarray) -> dict[str, dict]:
    """Per domain: tokens, parametric and served perplexity, mean lambda, through the retriever that serves."""
    retr = KNNRetriever(lm.store, gate, lm.vocab_size, bos=lm.tokenizer.eos_token_id)
    mixed = retr.mix_targets(pos, nb)
    every = np.ones(len(labels), bool)
    lam = retr.lambdas(nb, pos.lm, every, retr.recent(nb, pos, every), retr.match(nb, pos.context))
    out = {}
    for dom in sorted(set(labels.tolist())):
        m = labels == dom
        out[dom] = {"tokens": int(m.sum()), "parametric": _ppl(pos.logp_lm[m]), "gated": _ppl(mixed[m]),
                    "lambda_mean": float(lam[m].mean())}
    return out


def _never_search(dim: int) -> SkipPredictor:
    """A skip predictor that skips every search (the store is not used by a parametric fallback)."""
    return SkipPredictor(mean=[0.0] * (dim + 2), std=[1.0] * (dim + 2), weights=[0.0] * (dim + 2), bias=-60.0,
                         threshold=0.5)


def fallback_gate(gate: Gate, fixed: dict, nb: Neighbors, pos: PositionBatch, labels: np.ndarray,
                  tolerance: float, reason: str) -> Gate:
    """The strongest fixed lambda (the fitted one, halved until it passes) that keeps every domain within
    `tolerance` of the LM alone, as a gate of mode "fixed"; the LM alone (mode "parametric") when none does."""
    k = min(int(fixed["k"]), nb.tokens.shape[1])
    lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, fixed["tau"])
    have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(labels), bool)
    doms = sorted(set(labels.tolist()))
    tols = {d: LM_SAMPLES_FACTOR * tolerance if d == LM_SAMPLES else tolerance for d in doms}
    lam = float(fixed["lmbda"])
    while lam >= MIN_FIXED_LAMBDA:
        lp = mix_logp(pos.logp_lm, lk, np.where(have, lam, 0.0))
        if all(_ppl(lp[labels == d]) <= _ppl(pos.logp_lm[labels == d]) * (1 + tols[d]) for d in doms):
            return dataclasses.replace(gate, mode="fixed", fixed_lambda=lam, k=k, tau=float(fixed["tau"]),
                                       tau_slope=0.0, match_bonus=0.0, min_lambda=0.0, skip=None,
                                       fallback=f"{reason}; serving the fixed lambda {lam:.3g} (k={k}, "
                                                f"tau={fixed['tau']:.4g}) instead")
        lam /= 2
    return dataclasses.replace(gate, mode="parametric", fixed_lambda=0.0, min_lambda=0.0,
                               skip=_never_search(pos.keys.shape[1]),
                               fallback=f"{reason}; no fixed lambda passes every domain either: the store is not "
                                        "used (the LM alone is served)")


def judge(gate: Gate, report: dict, lm, nb: Neighbors, pos: PositionBatch, labels: np.ndarray, tolerance: float,
          fallback: bool) -> Gate:
    """Check the gate (held-out and as served); return it, or its fallback, or raise GateFitError."""
    held = held_out_rows(report.pop("held_out"))
    report["check"] = {"tolerance": tolerance, "held_out": held}
    served = served_rows(lm, gate, nb, pos, labels)
    failed = failures(held, served, tolerance)
    report["check"]["failures"] = failed
    if not failed:
        report["domains"] = served
        return gate
    reason = "the fitted gate failed its final check: " + "; ".join(failed)
    if not fallback:
        raise GateFitError(reason + ". Nothing was saved (gate.fallback: true saves a weaker mixture instead)")
    weaker = fallback_gate(gate, report["fixed"], nb, pos, labels, tolerance, reason)
    weaker.report = report
    report["domains"] = served_rows(lm, weaker, nb, pos, labels)
    report["warnings"].append(f"FALLBACK to the {weaker.mode} mixture: {weaker.fallback}")
    return weaker
