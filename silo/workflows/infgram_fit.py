"""Fitting the inf-gram's gate (silo/model/infgram.py) on validation text, by kNN-LM's gate machinery:
the same validation (near-copies of store text left out, every domain reported), the same text the LM
writes itself (its best lambda is 0), the bounded objective with its prior and per-domain guard
(silo.workflows.mixture_fit.fit_lambda), the floor (gate_fit.fit_floor) and the final check on held-out
positions and as served (gate_check.failures), falling back to the strongest fixed lambda that passes or to
no inf-gram at all, named in infgram.json.

Two gates per store: over the LM alone (mode `infgram`) and over the served kNN-LM (mode `knn+infgram`,
fitted where the store has a kNN gate or fixed settings): the combined mixture learns where the inf-gram
adds to what kNN-LM already gives, and is checked against kNN-LM itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from silo.model.infgram import InfgramGate, InfgramRetriever, PositionStats, features, load_gates, \
    position_continuations, save_gates
from silo.datastore.format import now
from silo.model.gate import STD_FLOOR, FEATURE_CLIP
from silo.model.knn import mix_logp
from silo.model.types import PositionBatch, SiloInputError

from .gate_check import LM_SAMPLES_FACTOR, MIN_FIXED_LAMBDA, failures, held_out_rows
from .gate_data import LM_SAMPLES, lm_sample_texts
from .gate_fit import GateConfig, _validation, fit_floor, guard_of
from .mixture_fit import GateFitError, Prior, fit_lambda, halves
from .tuning import domain_texts


@dataclass
class Part:
    """One domain's validation positions (or the LM's own text), with the token ids they were read from."""

    domain: str
    ids: list[list[int]]
    pos: PositionBatch


def _parts(cfg: GateConfig, lm, docs, say) -> list[Part]:
    parts = []
    for dom, texts in domain_texts(docs, cfg.max_tokens).items():
        ids = [lm.text_ids(t) for t in texts]
        parts.append(Part(dom, ids, lm.collect_ids(ids).truncate(cfg.max_tokens)))
    if cfg.lm_samples:
        ids = [lm.text_ids(t) for t in lm_sample_texts(lm, docs, cfg.lm_samples)]
        parts.append(Part(LM_SAMPLES, ids, lm.collect_ids(ids).truncate(cfg.lm_samples)))
        say(f"infgram: {len(parts[-1].pos.targets):,} positions of text the LM wrote itself join the fit")
    if not parts:
        raise SiloInputError("gate.val: no validation text (after decontamination)", "gate.val")
    return parts


@dataclass
class Problem:
    """What one inf-gram gate fit reads: per position the base's and the inf-gram's log p(target), the
    standardised features and which positions the store has a suffix for, each position's domain."""

    base: np.ndarray
    logp_inf: np.ndarray
    X: np.ndarray
    have: np.ndarray
    labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def _problem(lm, retr_ngrams, parts: list[Part], base_retriever) -> Problem:
    pos = PositionBatch.concat([p.pos for p in parts])
    conts = []
    for p in parts:
        conts += position_continuations(retr_ngrams, p.ids, limit=len(p.pos.targets))
    st = PositionStats.of(conts, pos.targets, pos.lm.top_token)
    from silo.model.evidence import recent_gain, token_gain

    recent = recent_gain(token_gain(st.logp, pos.logp_lm), st.have, pos.text_index)
    F = features(st, pos.lm, recent)
    have = st.have
    mean = F[have].mean(0) if have.any() else np.zeros(F.shape[1])
    std = np.maximum(F[have].std(0) if have.any() else np.ones(F.shape[1]), STD_FLOOR)
    base = base_retriever.mix_targets(pos) if base_retriever is not None else pos.logp_lm
    labels = np.concatenate([[p.domain] * len(p.pos.targets) for p in parts])
    return Problem(base, st.logp, np.clip((F - mean) / std, -FEATURE_CLIP, FEATURE_CLIP), have, labels, mean, std)


def _lam(fit, X: np.ndarray, have: np.ndarray) -> np.ndarray:
    z = np.clip((X @ fit.weights if X.shape[1] else 0.0) + fit.bias, -60, 60)
    return np.where(have, fit.lambda_max / (1.0 + np.exp(-z)), 0.0)


def _fit(prob: Problem, cfg: GateConfig) -> tuple[InfgramGate, dict]:
    """Fixed then gated fits on one half (held-out figures on the other), then on every position; the floor."""
    guard = guard_of(prob.labels, cfg.tolerance)
    n = len(prob.base)
    A, B = halves(n, block=max(16, min(256, n // 32)))
    none = np.zeros((n, 0))

    def pair(sel):
        fixed = fit_lambda(prob.logp_inf[sel], prob.base[sel], none[sel], prob.have[sel], lambda_max=cfg.lambda_max,
                           guard=guard.rows(sel))
        prior = Prior(bias=fixed.bias, strength=50.0 / max(int(sel.sum()), 1))
        gated = fit_lambda(prob.logp_inf[sel], prob.base[sel], prob.X[sel], prob.have[sel], prior=prior,
                           lambda_max=cfg.lambda_max, guard=guard.rows(sel))
        return fixed, gated

    fixed_A, gated_A = pair(A)
    held = {"labels": prob.labels[B], "parametric": prob.base[B],
            "fixed": mix_logp(prob.base[B], prob.logp_inf[B], _lam(fixed_A, none[B], prob.have[B])),
            "gated": mix_logp(prob.base[B], prob.logp_inf[B], _lam(gated_A, prob.X[B], prob.have[B]))}
    fixed, gated = pair(np.ones(n, bool))
    lam = _lam(gated, prob.X, prob.have)
    floor, floor_report = fit_floor(lam, lambda floored: mix_logp(prob.base, prob.logp_inf, floored), prob.labels)
    gate = InfgramGate(base="lm", mean=prob.mean.tolist(), std=prob.std.tolist(), weights=gated.weights.tolist(),
                       bias=gated.bias, lambda_max=cfg.lambda_max, min_lambda=floor, fitted=now())
    report = {"positions": n, "nll_base": float(-prob.base.mean()), "nll_gated": gated.nll, "nll_fixed": fixed.nll,
              "fixed": {"lmbda": fixed.lmbda}, "min_lambda": floor_report,
              "have_share": float(prob.have.mean()), "lambda_mean": float(lam.mean()),
              "check": {"tolerance": cfg.tolerance, "held_out": held_out_rows(held)}, "warnings": []}
    return gate, report


def _served(lm, retriever: InfgramRetriever, parts: list[Part]) -> dict[str, dict]:
    """Per domain, through the retriever that serves: base and served perplexity, mean lambda."""
    out = {}
    for p in parts:
        base = retriever.base.mix_targets(p.pos) if retriever.base is not None else p.pos.logp_lm
        lp, lam, _ = retriever.mix_positions(p.pos, p.ids, base_logp=base)
        out[p.domain] = {"tokens": int(len(lp)), "parametric": math.exp(-float(base.mean())),
                         "gated": math.exp(-float(lp.mean())), "lambda_mean": float(lam.mean())}
    return out


def _fallback(gate: InfgramGate, prob: Problem, lam0: float, tolerance: float, reason: str) -> InfgramGate:
    """The strongest fixed lambda (halved from the fitted one) keeping every domain within tolerance of the
    base; the base alone (mode parametric) when none does."""
    doms = sorted(set(prob.labels.tolist()))
    lam = lam0
    while lam >= MIN_FIXED_LAMBDA:
        lp = mix_logp(prob.base, prob.logp_inf, np.where(prob.have, lam, 0.0))
        ok = all(-lp[prob.labels == d].mean() <= -prob.base[prob.labels == d].mean()
                 + math.log1p((LM_SAMPLES_FACTOR if d == LM_SAMPLES else 1.0) * tolerance) for d in doms)
        if ok:
            return replace(gate, mode="fixed", fixed_lambda=lam, min_lambda=0.0,
                           fallback=f"{reason}; serving the fixed lambda {lam:.3g} instead")
        lam /= 2
    return replace(gate, mode="parametric", fixed_lambda=0.0, min_lambda=0.0,
                   fallback=f"{reason}; no fixed lambda passes every domain either: the inf-gram is not used")


def fit_store_infgram(cfg: GateConfig, lm=None, bases: tuple[str, ...] = ("lm", "knn"), progress: bool = True,
                      save: bool = True) -> dict[str, InfgramGate]:
    """Fit, check and save (infgram.json beside the store) the inf-gram gate over each of `bases`."""
    from silo.model.lm import SiloLM

    say = print if progress else (lambda *a, **k: None)
    lm = lm or SiloLM.load(cfg.model, cfg.store, window=cfg.window, stride=cfg.stride)
    if lm.store is None:
        raise SiloInputError("gate.store: the LM has no datastore attached", "gate.store")
    ngrams, problem, gates = lm.ngrams()
    if ngrams is None:
        raise SiloInputError(f"gate.store: {problem}", "gate.store")
    docs, _ = _validation(cfg, lm.store, say)
    gates = dict(gates)
    try:
        with np.errstate(over="raise", invalid="ignore", divide="ignore"):
            parts = _parts(cfg, lm, docs, say)
            for base in bases:
                gates[base] = _fit_one(cfg, lm, ngrams, parts, base, say)
    except FloatingPointError as exc:
        raise GateFitError(f"inf-gram gate fit for {lm.store.path}: a non-finite value ({exc}); nothing was saved") from None
    if save:
        path = save_gates(lm.store.path, gates)
        lm.swap_store(lm.store)  # the cached gates belonged to the old file
        say(f"infgram: gates {', '.join(f'{k} ({g.mode})' for k, g in gates.items())} saved to {path}")
    return gates


def _fit_one(cfg: GateConfig, lm, ngrams, parts: list[Part], base: str, say) -> InfgramGate:
    knn = lm.retriever("knn") if base == "knn" else None
    prob = _problem(lm, ngrams, parts, knn)
    gate, report = _fit(prob, cfg)
    gate = replace(gate, base=base, fingerprint=lm.store.fingerprint, generation=lm.store.generation)
    served = _served(lm, InfgramRetriever(lm.store, ngrams, gate, lm.vocab_size, knn), parts)
    failed = failures(report["check"]["held_out"], served, cfg.tolerance)
    report["check"]["failures"] = failed
    report["domains"] = served
    if failed:
        reason = f"the inf-gram gate over the {base} failed its final check: " + "; ".join(failed)
        if not cfg.fallback:
            raise GateFitError(reason + ". Nothing was saved")
        gate = _fallback(gate, prob, report["fixed"]["lmbda"], cfg.tolerance, reason)
        report["warnings"].append(f"FALLBACK to the {gate.mode} mixture: {gate.fallback}")
        report["domains"] = _served(lm, InfgramRetriever(lm.store, ngrams, gate, lm.vocab_size, knn), parts)
    gate.report = report
    for dom, r in report["domains"].items():
        say(f"infgram[{base}]: {dom}: base {r['parametric']:.2f} -> {r['gated']:.2f} (mean lambda {r['lambda_mean']:.3f})")
    for w in report["warnings"]:
        say(f"infgram[{base}]: WARNING: {w}")
    return gate


__all__ = ["fit_store_infgram", "load_gates"]
