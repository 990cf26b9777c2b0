"""Fitting a store's gate (silo/model/gate.py) on validation text, so that it cannot make things worse.

The gate is fitted once per store on all validation domains together, by maximum likelihood in the
bounded parameterisation of silo.workflows.mixture_fit, k chosen among a list (up to 1,024, SILO's
setting) on a held-out half of the positions. What makes it transfer to a store it was not made for:

* its distance unit (`tau_ref`) is the store's own: the median distance from a sample of the store's keys
  to their nearest neighbour outside their own passage (`store_distance_scale`), not a statistic of
  whatever validation text the user has; standardising scales have a floor and standardised features
  are clipped, so a feature that was nearly constant on validation cannot blow up elsewhere;
* besides the user's validation it reads text the LM writes itself (`lm_sample_texts`): the mixture's
  best lambda there is 0 by construction, so the fit always sees what text the store does not hold looks
  like, even when every validation document is of the store's kind;
* priors pull it to the tuned fixed lambda when positions are few;
* a final check (silo.workflows.gate_check): on held-out positions and per domain it must not be worse
  than the LM alone nor than the fixed lambda, or it is not saved (a named weaker mixture is, or the
  command fails); a non-finite value anywhere is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from silo.core.config import StageConfig
from silo.core.corpus import Document
from silo.datastore.format import now
from silo.datastore.store import Datastore, Neighbors
from silo.model.gate import LAMBDA_MAX, MATCH_K, STD_FLOOR, FEATURE_CLIP, Gate, SkipPredictor, knn_features, \
    recent_gain, token_gain
from silo.model.knn import knn_target_logprob, mix_logp
from silo.model.types import PositionBatch, SiloInputError

from .decontam import OVERLAP_FRACTION
from .gate_data import LM_SAMPLES, lm_sample_texts, store_distance_scale, validation_positions  # noqa: F401
from .mixture_fit import (L2, Fit, GateFitError, Guard, Prior, _t, choose_k, distance_scale, fit_fixed,  # noqa: F401
                          fit_mixture, fixed_logp, halves, mixture_logp)

@dataclass
class GateProblem:
    """What one gate fit reads: positions, neighbours, context match, the distance unit, and the
    standardised features at each k (computed once per k)."""

    store: Datastore
    nb: Neighbors
    pos: PositionBatch
    match: np.ndarray
    tau_ref: float
    lambda_max: float = LAMBDA_MAX
    guard: Guard | None = None
    _feats: dict = field(default_factory=dict)

    def features(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X standardised and clipped, rows with a neighbour, mean, std) at k."""
        if k not in self._feats:
            nb, pos = self.nb, self.pos
            lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, self.tau_ref)
            has = nb.tokens[:, 0] >= 0
            recent = recent_gain(token_gain(lk, pos.logp_lm), has, pos.text_index)
            F, have = knn_features(nb, self.store.doc_keys(nb), pos.lm, k, self.tau_ref, recent, self.match)
            mean = F[have].mean(0) if have.any() else np.zeros(F.shape[1])
            std = np.maximum(F[have].std(0) if have.any() else np.ones(F.shape[1]), STD_FLOOR)
            X = np.clip((F - mean) / std, -FEATURE_CLIP, FEATURE_CLIP)
            self._feats[k] = (X, have, mean, std)
        return self._feats[k]

    def fixed(self, sel: np.ndarray, k: int) -> Fit:
        nb, pos = self.nb.rows(sel), self.pos.rows(sel)
        have = nb.tokens[:, 0] >= 0
        return fit_mixture(nb, pos.targets, pos.logp_lm, np.zeros((len(pos.targets), 0)), have, k, self.tau_ref,
                           lambda_max=self.lambda_max)

    def gated(self, sel: np.ndarray, k: int, prior: Fit) -> Fit:
        X, have, _, _ = self.features(k)
        return fit_mixture(self.nb.rows(sel), self.pos.targets[sel], self.pos.logp_lm[sel], X[sel], have[sel], k,
                           self.tau_ref, variable_tau=True, match=self.match[sel],
                           prior=Prior.of(prior, self.tau_ref, int(sel.sum())), lambda_max=self.lambda_max,
                           guard=self.guard.rows(sel) if self.guard is not None else None)

    def gated_logp(self, sel: np.ndarray, f: Fit) -> np.ndarray:
        """log p(target) per position of `sel` under the gate `f` (unfloored)."""
        import torch

        from silo.model.gate import TAU_LOG_RANGE, tau_log_ratio

        X, have, _, _ = self.features(f.k)
        nb, t = self.nb.rows(sel), self.pos.targets[sel]
        tok = nb.tokens[:, :f.k]
        valid = tok >= 0
        lo, hi = math.log(self.tau_ref) - TAU_LOG_RANGE, math.log(self.tau_ref) + TAU_LOG_RANGE
        log_tau = np.clip(math.log(f.tau) + f.tau_slope * tau_log_ratio(nb.distances[:, 0], self.tau_ref), lo, hi)
        with torch.no_grad():
            return mixture_logp(_t(np.where(valid, nb.distances[:, :f.k], 0.0)), _t(valid, torch.bool),
                                _t(valid & (tok == t[:, None]), torch.bool), _t(self.pos.logp_lm[sel]),
                                _t(have[sel], torch.bool), _t(X[sel]), _t(f.weights),
                                torch.tensor(f.bias, dtype=torch.float64), _t(log_tau),
                                f.match_bonus * _t(self.match[sel, :f.k]), f.lambda_max).numpy()

    def fixed_logp(self, sel: np.ndarray, f: Fit) -> np.ndarray:
        return fixed_logp(self.nb.rows(sel), self.pos.targets[sel], self.pos.logp_lm[sel], f)


def guard_of(labels: np.ndarray, tolerance: float) -> Guard:
    """The fit's per-domain guard: each domain may lose at most half the final check's tolerance to the LM
    alone (text the LM wrote itself: half of its looser bound), so the check has room to spare."""
    from .gate_check import LM_SAMPLES_FACTOR

    doms, groups = np.unique(labels, return_inverse=True)
    slack = np.array([math.log1p((LM_SAMPLES_FACTOR if d == LM_SAMPLES else 1.0) * tolerance / 2) for d in doms])
    return Guard(groups, slack)


def fit_gate(store: Datastore, nb: Neighbors, pos: PositionBatch, ks: list[int], skip: bool = True,
             bos: int = 0, labels: np.ndarray | None = None, tau_ref: float | None = None,
             lambda_max: float = LAMBDA_MAX, tolerance: float = 0.01) -> tuple[Gate, dict]:
    """The gate for `store`: for each k, the fixed mixture and then the gate (pulled towards it) on one half
    of the positions, k chosen on the other; then both on all positions; its lambda floor (`fit_floor`, per
    domain of `labels`) and the retrieval-skipping predictor. `tau_ref`: the store's distance unit
    (`store_distance_scale`; default: these positions' median nearest distance). Returns (gate, report);
    the report's "held_out" holds what the final check reads: per position of the held-out half, its
    domain and log p under the LM, the fixed mixture and the gate fitted without it."""
    labels = np.zeros(len(pos.targets), int).astype(str) if labels is None else np.asarray(labels)
    scale_source = "store" if tau_ref else "validation"
    prob = GateProblem(store, nb, pos, store.context_match(nb, pos.context, bos, MATCH_K),
                       tau_ref or distance_scale(nb), lambda_max, guard_of(labels, tolerance))
    ks = [k for k in ks if k <= nb.tokens.shape[1]] or [nb.tokens.shape[1]]
    A, B = halves(len(pos.targets), block=max(16, min(256, len(pos.targets) // 32)))
    fixed_A = {k: prob.fixed(A, k) for k in ks}
    best, rows, warns, gated_A = choose_k(ks, lambda k: prob.gated(A, k, fixed_A[k]),
                                          lambda f: float(-prob.gated_logp(B, f).mean()))
    every = np.ones(len(pos.targets), bool)
    fixed = prob.fixed(every, best)
    fit = prob.gated(every, best, fixed)
    X, have, mean, std = prob.features(best)
    gate = Gate(k=best, tau=fit.tau, tau_ref=prob.tau_ref, tau_slope=fit.tau_slope, match_bonus=fit.match_bonus,
                mean=mean.tolist(), std=std.tolist(), weights=fit.weights.tolist(), bias=fit.bias,
                fingerprint=store.fingerprint, generation=store.generation, fitted=now(), lambda_max=lambda_max,
                scale_source=scale_source)
    lam = np.where(have, lambda_max / (1.0 + np.exp(-np.clip(X @ fit.weights + fit.bias, -60, 60))), 0.0)
    report = {"k_search": rows, "warnings": warns + fit.warnings, "positions": int(len(pos.targets)),
              "tau_ref": prob.tau_ref, "scale_source": scale_source, "lambda_max": lambda_max,
              "nll_parametric": float(-pos.logp_lm.mean()), "nll_gated": fit.nll, "nll_fixed": fixed.nll,
              "fixed": {"k": fixed.k, "lmbda": fixed.lmbda, "tau": fixed.tau},
              "lambda_mean": float(lam.mean()), "lambda_quantiles": {q: float(np.quantile(lam, q)) for q in (0.1, 0.5, 0.9)},
              "held_out": {"labels": labels[B], "parametric": pos.logp_lm[B], "fixed": prob.fixed_logp(B, fixed_A[best]),
                           "gated": prob.gated_logp(B, gated_A[best])}}
    lk = knn_target_logprob(nb.distances[:, :gate.k], nb.tokens[:, :gate.k], pos.targets, gate.taus(nb),
                            gate.bonus(prob.match))
    gate.min_lambda, report["min_lambda"] = fit_floor(lam, lambda floored: mix_logp(pos.logp_lm, lk, floored), labels)
    lam = gate.floor(lam)
    if skip:  # fitted on the floored gate: positions it leaves at 0 cost nothing to skip
        def nll_with(searched):  # lambda forced to 0 where the search was skipped, the others as they were
            return float(-mix_logp(pos.logp_lm, lk, np.where(searched, lam, 0.0)).mean())

        gate.skip = fit_skip(pos, lam, nll_with)
        report["skip"] = {"threshold": gate.skip.threshold, "curve": gate.skip.curve}
    gate.report = report
    return gate, report


SKIP_THRESHOLDS = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
MIN_LAMBDAS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)


def fit_floor(lam: np.ndarray, mixed_logp, labels: np.ndarray, tolerance: float = 0.005) -> tuple[float, dict]:
    """The gate's lambda floor: the largest of MIN_LAMBDAS such that it and every smaller one keep each
    domain's validation perplexity within `tolerance` (relative) of the unfloored gate. `mixed_logp(lam)`:
    log p(target) per position under the mixture with those lambdas; `labels`: each position's domain."""
    doms = np.unique(labels)

    def per_domain(lp):  # mean NLL per domain: compared in log space, finite while lambda < 1
        return np.array([-lp[labels == d].mean() for d in doms])

    base = per_domain(mixed_logp(lam))
    curve, chosen = [], 0.0
    for th in MIN_LAMBDAS:
        floored = np.where(lam >= th, lam, 0.0)
        rel = np.exp(per_domain(mixed_logp(floored)) - base)
        curve.append({"min_lambda": th, "zeroed": float(((lam > 0) & (lam < th)).mean()),
                      "worst_relative": float(rel.max()), "worst_domain": str(doms[int(rel.argmax())])})
        if rel.max() > 1 + tolerance:
            break
        chosen = th
    return chosen, {"chosen": chosen, "tolerance": tolerance, "curve": curve}


def fit_skip(pos: PositionBatch, lam: np.ndarray, nll_with, tolerance: float = 0.0025) -> SkipPredictor:
    """Logistic regression from the LM's state (key, entropy, top probability) to the gate's lambda, and
    its default threshold: the largest in SKIP_THRESHOLDS whose validation perplexity stays within
    `tolerance` (relative) of searching everywhere."""
    import torch

    sp = SkipPredictor(mean=[], std=[], weights=[], bias=0.0)
    x = sp.inputs(pos.keys, pos.lm)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    X, y = _t((x - mean) / std), _t(lam)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + L2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    sp.mean, sp.std, sp.weights, sp.bias = mean.tolist(), std.tolist(), w.detach().numpy().tolist(), float(b.detach())
    pred = sp.predict(pos.keys, pos.lm)
    base = nll_with(np.ones(len(lam), bool))
    curve, chosen = [], 0.0
    for th in SKIP_THRESHOLDS:
        searched = pred >= th
        rel = math.exp(nll_with(searched) - base)
        curve.append({"threshold": th, "skipped": float(1 - searched.mean()), "perplexity": math.exp(base) * rel,
                      "relative": rel})
        if rel <= 1 + tolerance:
            chosen = th
    sp.threshold, sp.curve = chosen, curve
    return sp


# --------------------------------------------------------------------------------------------- workflow

class GateConfig(StageConfig):
    """The `gate:` section: which store to fit a gate for, on which validation text."""

    model: str
    store: str
    val: list[str] = ["pkg:demo/val"]
    domains: list[str] | None = None
    max_tokens: int = Field(4000, gt=0)  # scored validation tokens per domain
    k: list[int] = [16, 64, 256, 1024]  # neighbours tried (chosen on a held-out half)
    window: int | None = Field(None, gt=1)
    stride: int | None = Field(None, gt=0)
    skip: bool = True  # also fit the retrieval-skipping predictor
    keep_overlap: bool = False  # keep validation documents that are near-copies of store text
    overlap_fraction: float = Field(OVERLAP_FRACTION, gt=0.0, le=1.0)  # share of 13-grams that makes a near-copy
    lambda_max: float = Field(LAMBDA_MAX, gt=0.5, lt=1.0)  # lambda's upper bound: p_LM keeps 1 - this
    lm_samples: int = Field(2000, ge=0)  # tokens of text the LM writes itself, fitted on beside validation
    tolerance: float = Field(0.01, ge=0.0, le=0.5)  # final check: per domain, at most this much worse than the LM
    fallback: bool = True  # a gate that fails its check: save a named weaker mixture (false: fail, save nothing)


def _validation(cfg: GateConfig, store: Datastore, say) -> tuple[list[Document], list[dict]]:
    """The validation documents left after decontamination, each overlap reported (and LOUDLY each domain
    that lost all its documents); an error when none is left."""
    from silo.core.corpus import load_documents

    from .decontam import decontaminate, emptied_domains, overlap_lines

    given = load_documents(cfg.val, cfg.domains)
    docs, overlaps = decontaminate(given, store, keep=cfg.keep_overlap, threshold=cfg.overlap_fraction)
    emptied = emptied_domains(given, docs)
    for line in overlap_lines("gate.val", overlaps, emptied, cfg.keep_overlap):
        say(f"gate: {'WARNING: ' if 'DOMAIN' in line else ''}{line}")
    if given and not docs:
        raise GateFitError(f"gate.val: all {len(given)} validation document(s) are near-copies of store text "
                           f"(at least {cfg.overlap_fraction:.0%} of their 13-grams are in the store) and were left "
                           "out; give validation text the store does not hold, or --keep-overlap. Nothing was saved")
    notes = [f"validation domain {d!r}: all {n} document(s) left out as near-copies of the store; the gate is "
             "fitted without it" for d, n in emptied.items()]
    return docs, [o.to_json() for o in overlaps] + [{"note": n} for n in notes]


def _positions(cfg: GateConfig, lm, docs: list[Document], say) -> tuple[PositionBatch, np.ndarray]:
    """Validation positions of every domain, then those of text the LM writes itself (`LM_SAMPLES`)."""
    pos, labels = validation_positions(lm, docs, cfg.max_tokens)
    if cfg.lm_samples:
        texts = lm_sample_texts(lm, docs, cfg.lm_samples)
        own = lm.collect(texts).truncate(cfg.lm_samples)
        pos, labels = PositionBatch.concat([pos, own]), labels + [LM_SAMPLES] * len(own.targets)
        say(f"gate: {len(own.targets):,} positions of text the LM wrote itself (its best lambda is 0) join the fit")
    return pos, np.asarray(labels)


def fit_store_gate(cfg: GateConfig, lm=None, progress: bool = True, save: bool = True) -> tuple[Gate, dict]:
    """Fit the gate of `cfg.store` on `cfg.val` (near-copies left out) and text the LM writes, check it on
    held-out positions and per domain, and save it (or the named fallback) beside the store. Raises
    GateFitError (nothing saved) on a non-finite value, no validation left, or a failed check without
    `cfg.fallback`."""
    from silo.model.lm import SiloLM

    from .gate_check import judge

    say = print if progress else (lambda *a, **k: None)
    lm = lm or SiloLM.load(cfg.model, cfg.store, window=cfg.window, stride=cfg.stride)
    if lm.store is None:
        raise SiloInputError("gate.store: the LM has no datastore attached", "gate.store")
    docs, overlaps = _validation(cfg, lm.store, say)
    try:
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            pos, labels = _positions(cfg, lm, docs, say)
            scale = store_distance_scale(lm.store)
            say(f"gate: {len(pos.targets):,} positions ({', '.join(sorted(set(labels.tolist())))}); searching "
                f"{lm.store.num_entries:,} entries at k={max(cfg.k)}; the store's distance unit "
                + (f"{scale:.4g} (its own keys)" if scale else "unknown (no stored keys): the validation's"))
            nb = lm.store.search(pos.keys, max(cfg.k))
            gate, report = fit_gate(lm.store, nb, pos, cfg.k, skip=cfg.skip, bos=lm.tokenizer.eos_token_id,
                                    labels=labels, tau_ref=scale, lambda_max=cfg.lambda_max, tolerance=cfg.tolerance)
            gate = judge(gate, report, lm, nb, pos, labels, cfg.tolerance, cfg.fallback)
    except FloatingPointError as exc:
        raise GateFitError(f"gate fit for {lm.store.path}: a non-finite value ({exc}); nothing was saved") from None
    report.update(overlaps=overlaps, validation=cfg.val)
    for w in report["warnings"] + [o["note"] for o in overlaps if "note" in o]:
        say(f"gate: WARNING: {w}")
    if save:
        path = gate.save(lm.store.path)
        say(f"gate: {gate.mode}, k={gate.k}, tau={gate.tau:.4g} (distance unit {gate.tau_ref:.4g}); saved to {path}")
    return gate, report
