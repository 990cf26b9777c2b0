"""Fitting the kNN-LM mixture on validation text by maximum likelihood.

One objective serves both mixtures: the log-likelihood of the validation tokens under

    p(y) = lambda * p_kNN(y; tau) + (1 - lambda) * p_LM(y),   lambda = sigmoid(w . features + b)

maximised over (w, b, log tau) with L-BFGS from one search at the largest k. With no features it is the
fixed mixture (lambda = sigmoid(b), the paper's protocol, tuned per domain); with the gate's features it
is the per-token gate (silo/model/gate.py), fitted once per store on all validation domains together so
it sees text the store holds and text it does not. k is chosen from a list (up to 1,024, SILO's setting)
on a held-out half of the positions; a chosen value on the edge of a search range is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from silo.core.config import StageConfig
from silo.core.corpus import Document, load_documents
from silo.datastore.store import Datastore, Neighbors
from silo.model.gate import MATCH_K, Gate, SkipPredictor, knn_features, now, recent_gain, tau_log_ratio, token_gain
from silo.model.knn import KNNRetriever, knn_target_logprob, mix_logp
from silo.model.types import PositionBatch, SiloInputError

from .tuning import domain_texts

L2 = 1e-3  # weight decay on the gate's feature weights (features are standardised)
LOG_TAU_SPAN = 8.0  # tau is searched within tau_ref * exp(+-LOG_TAU_SPAN)


@dataclass
class Fit:
    """The result of one maximum-likelihood fit."""

    k: int
    tau: float
    weights: np.ndarray
    bias: float
    nll: float  # mean negative log-likelihood on the positions it was fitted on
    warnings: list[str] = field(default_factory=list)
    tau_slope: float = 0.0
    match_bonus: float = 0.0

    @property
    def lmbda(self) -> float:  # the fixed mixture's lambda
        return 1.0 / (1.0 + math.exp(-self.bias))


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)


def mixture_nll(D, valid, hit, logp_lm, have, X, w, b, log_tau, bonus=None) -> torch.Tensor:
    """Mean negative log-likelihood of the targets under the mixture (torch, differentiable). `log_tau` is
    one number or one per row; `bonus` [n, <=k] is added to the first neighbours' logits."""
    log_tau = log_tau if log_tau.dim() == 0 else log_tau[:, None]
    a = -D / torch.exp(log_tau)
    if bonus is not None and bonus.shape[1]:
        m = min(bonus.shape[1], a.shape[1])
        a = torch.cat([a[:, :m] + bonus[:, :m], a[:, m:]], dim=1)
    neg = torch.tensor(-1e30, dtype=a.dtype)
    lse_all = torch.logsumexp(torch.where(valid, a, neg), dim=1)
    lse_hit = torch.logsumexp(torch.where(hit, a, neg), dim=1)
    log_pknn = lse_hit - lse_all
    z = (X @ w if X.shape[1] else torch.zeros_like(logp_lm)) + b
    mixed = torch.logaddexp(torch.nn.functional.logsigmoid(z) + log_pknn,
                            torch.nn.functional.logsigmoid(-z) + logp_lm)
    return -torch.where(have, mixed, logp_lm).mean()


def fit_mixture(nb: Neighbors, targets: np.ndarray, logp_lm: np.ndarray, X: np.ndarray, have: np.ndarray, k: int,
                tau_ref: float, lmbda0: float = 0.2, max_iter: int = 60, variable_tau: bool = False,
                match: np.ndarray | None = None) -> Fit:
    """Maximum-likelihood (w, b, tau) for the first k neighbours; X [n, F] standardised features (F may be 0).
    With `variable_tau`, tau = tau0 * (d1 / tau_ref) ** slope and the slope is fitted too; with `match`
    (context-match lengths of the first neighbours) a per-token bonus on their logits is fitted too."""
    tok = nb.tokens[:, :k]
    valid = tok >= 0
    D = _t(np.where(valid, nb.distances[:, :k], 0.0))
    hit = _t(valid & (tok == targets[:, None]), torch.bool)
    valid_t = _t(valid, torch.bool)
    lp = _t(logp_lm)
    have_t = _t(have, torch.bool)
    Xt = _t(X)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(math.log(lmbda0 / (1 - lmbda0)), dtype=torch.float64, requires_grad=True)
    lo, hi = math.log(tau_ref) - LOG_TAU_SPAN, math.log(tau_ref) + LOG_TAU_SPAN
    raw = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)  # log tau = mid + span * tanh(raw)
    slope = torch.tensor(0.0, dtype=torch.float64, requires_grad=variable_tau)
    ratio = _t(tau_log_ratio(nb.distances[:, 0], tau_ref)) if variable_tau else None

    def log_tau():
        base = (lo + hi) / 2 + (hi - lo) / 2 * torch.tanh(raw)
        return base + slope * ratio if variable_tau else base

    gamma = torch.tensor(0.0, dtype=torch.float64, requires_grad=match is not None)
    M = _t(match[:, :k]) if match is not None else None
    params = [w, b, raw] + ([slope] if variable_tau else []) + ([gamma] if match is not None else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def bonus():
        return None if M is None else gamma * M

    def closure():
        opt.zero_grad()
        loss = mixture_nll(D, valid_t, hit, lp, have_t, Xt, w, b, log_tau(), bonus()) + L2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll = float(mixture_nll(D, valid_t, hit, lp, have_t, Xt, w, b, log_tau(), bonus()))
        tau = float(torch.exp((lo + hi) / 2 + (hi - lo) / 2 * torch.tanh(raw)))
    fit = Fit(k=k, tau=tau, weights=w.detach().numpy().copy(), bias=float(b.detach()), nll=nll,
              tau_slope=float(slope.detach()), match_bonus=float(gamma.detach()))
    if abs(float(torch.tanh(raw.detach()))) > 0.99:
        fit.warnings.append(f"tau {tau:.4g} is at the edge of its search range (tau_ref {tau_ref:.4g} x e^+-"
                            f"{LOG_TAU_SPAN:g})")
    return fit


def distance_scale(nb: Neighbors) -> float:
    """Median nearest-neighbour distance: the unit of the gate's distance features."""
    d1 = nb.distances[:, 0] if nb.distances.shape[1] else np.zeros(0)
    d1 = d1[np.isfinite(d1) & (nb.tokens[:, 0] >= 0)] if len(d1) else d1
    return float(np.median(d1)) if len(d1) and np.median(d1) > 0 else 1.0


def choose_k(ks: list[int], fit_one, held_nll) -> tuple[int, list[dict], list[str]]:
    """Fit on one half for each k, keep the k with the best held-out NLL; warn when it is an end of the list."""
    rows = []
    for k in ks:
        f = fit_one(k)
        rows.append({"k": k, "fit_nll": f.nll, "held_nll": held_nll(f)})
    best = min(rows, key=lambda r: r["held_nll"])["k"]
    warns = []
    if len(ks) > 1 and best == max(ks):
        warns.append(f"k {best} is the largest value tried ({ks}); a larger k may fit better")
    if len(ks) > 1 and best == min(ks):
        warns.append(f"k {best} is the smallest value tried ({ks})")
    return best, rows, warns


def halves(n: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Alternate blocks of consecutive positions: two halves that both cover every domain."""
    a = (np.arange(n) // block) % 2 == 0
    return a, ~a


def _lambda_warnings(lmbda: float) -> list[str]:
    if lmbda > 0.98:
        return [f"lambda {lmbda:.3f} is at the upper edge (1): the store carries nearly everything"]
    return []


def fit_fixed(nb: Neighbors, pos: PositionBatch, ks: list[int], tau_ref: float) -> tuple[Fit, list[dict]]:
    """The fixed mixture (one lambda, one tau) for these positions, k chosen on a held-out half."""
    have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(pos.targets), bool)
    X = np.zeros((len(pos.targets), 0))
    A, B = halves(len(pos.targets))

    def fit_on(sel, k):
        return fit_mixture(nb.rows(sel), pos.targets[sel], pos.logp_lm[sel], X[sel], have[sel], k, tau_ref)

    def held(f: Fit) -> float:
        return _nll_fixed(nb.rows(B), pos.targets[B], pos.logp_lm[B], have[B], f)

    ks = [k for k in ks if k <= nb.tokens.shape[1]] or [nb.tokens.shape[1]]
    best, rows, warns = choose_k(ks, lambda k: fit_on(A, k), held)
    fit = fit_on(slice(None), best)
    fit.warnings = warns + fit.warnings + _lambda_warnings(fit.lmbda)
    return fit, rows


def _nll_fixed(nb, targets, logp_lm, have, f: Fit) -> float:
    tok = nb.tokens[:, :f.k]
    valid = tok >= 0
    return float(mixture_nll(_t(np.where(valid, nb.distances[:, :f.k], 0.0)), _t(valid, torch.bool),
                             _t(valid & (tok == targets[:, None]), torch.bool), _t(logp_lm), _t(have, torch.bool),
                             _t(np.zeros((len(targets), 0))), torch.zeros(0, dtype=torch.float64),
                             torch.tensor(f.bias, dtype=torch.float64),
                             torch.tensor(math.log(f.tau), dtype=torch.float64)))


def fit_gate(store: Datastore, nb: Neighbors, pos: PositionBatch, ks: list[int], skip: bool = True,
             bos: int = 0, labels: np.ndarray | None = None) -> tuple[Gate, dict]:
    """The gate for `store`: features standardised on these positions, (w, b, tau) by maximum likelihood,
    k chosen on a held-out half; its lambda floor (`fit_floor`, per domain of `labels`); and the
    retrieval-skipping predictor. Returns (gate, report)."""
    tau_ref = distance_scale(nb)
    doc_keys = store.doc_keys(nb)
    match = store.context_match(nb, pos.context, bos, MATCH_K)
    ks = [k for k in ks if k <= nb.tokens.shape[1]] or [nb.tokens.shape[1]]
    A, B = halves(len(pos.targets))
    feats: dict[int, tuple] = {}

    def standardised(k):
        if k not in feats:
            lk = knn_target_logprob(nb.distances[:, :k], nb.tokens[:, :k], pos.targets, tau_ref)
            has = nb.tokens[:, 0] >= 0
            recent = recent_gain(token_gain(lk, pos.logp_lm), has, pos.text_index)
            F, have = knn_features(nb, doc_keys, pos.lm, k, tau_ref, recent, match)
            mean = F[have].mean(0) if have.any() else np.zeros(F.shape[1])
            std = F[have].std(0) if have.any() else np.ones(F.shape[1])
            std = np.where(std > 1e-9, std, 1.0)
            feats[k] = ((F - mean) / std, have, mean, std)
        return feats[k]

    def fit_on(sel, k):
        X, have, _, _ = standardised(k)
        return fit_mixture(nb.rows(sel), pos.targets[sel], pos.logp_lm[sel], X[sel], have[sel], k, tau_ref,
                           variable_tau=True, match=match[sel])

    def held(f: Fit) -> float:
        X, have, _, _ = standardised(f.k)
        tok = nb.tokens[B, :f.k]
        valid = tok >= 0
        return float(mixture_nll(_t(np.where(valid, nb.distances[B, :f.k], 0.0)), _t(valid, torch.bool),
                                 _t(valid & (tok == pos.targets[B, None]), torch.bool), _t(pos.logp_lm[B]),
                                 _t(have[B], torch.bool), _t(X[B]), _t(f.weights), torch.tensor(f.bias, dtype=torch.float64),
                                 _t(math.log(f.tau) + f.tau_slope * tau_log_ratio(nb.distances[B, 0], tau_ref)),
                                 f.match_bonus * _t(match[B, :f.k])))

    best, rows, warns = choose_k(ks, lambda k: fit_on(A, k), held)
    fit = fit_on(slice(None), best)
    X, have, mean, std = standardised(best)
    gate = Gate(k=best, tau=fit.tau, tau_ref=tau_ref, tau_slope=fit.tau_slope,
                match_bonus=fit.match_bonus, mean=mean.tolist(), std=std.tolist(),
                weights=fit.weights.tolist(), bias=fit.bias, fingerprint=store.fingerprint,
                generation=store.generation, fitted=now())
    lam = np.where(have, 1.0 / (1.0 + np.exp(-(X @ fit.weights + fit.bias))), 0.0)
    report = {"k_search": rows, "warnings": warns + fit.warnings, "positions": int(len(pos.targets)),
              "nll_parametric": float(-pos.logp_lm.mean()), "nll_gated": fit.nll,
              "lambda_mean": float(lam.mean()), "lambda_quantiles": {q: float(np.quantile(lam, q)) for q in (0.1, 0.5, 0.9)}}
    lk = knn_target_logprob(nb.distances[:, :gate.k], nb.tokens[:, :gate.k], pos.targets, gate.taus(nb),
                            gate.bonus(match))
    gate.min_lambda, report["min_lambda"] = fit_floor(
        lam, lambda floored: mix_logp(pos.logp_lm, lk, floored),
        np.zeros(len(lam), int) if labels is None else np.asarray(labels))
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

    def per_domain(lp):
        return np.array([math.exp(-lp[labels == d].mean()) for d in doms])

    base = per_domain(mixed_logp(lam))
    curve, chosen = [], 0.0
    for th in MIN_LAMBDAS:
        floored = np.where(lam >= th, lam, 0.0)
        rel = per_domain(mixed_logp(floored)) / base
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
    sp = SkipPredictor(mean=[], std=[], weights=[], bias=0.0)
    x = sp.inputs(pos.keys, pos.lm)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 1e-9, std, 1.0)
    X = _t((x - mean) / std)
    y = _t(lam)
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
    base = math.exp(nll_with(np.ones(len(lam), bool)))
    curve, chosen = [], 0.0
    for th in SKIP_THRESHOLDS:
        searched = pred >= th
        ppl = math.exp(nll_with(searched))
        curve.append({"threshold": th, "skipped": float(1 - searched.mean()), "perplexity": ppl,
                      "relative": ppl / base})
        if ppl <= base * (1 + tolerance):
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
    keep_overlap: bool = False  # keep validation documents that share 13-grams with the store


def validation_positions(lm, docs: list[Document], max_tokens: int) -> tuple[PositionBatch, list[str]]:
    """Every domain's first `max_tokens` scored positions, in one batch; and each position's domain."""
    parts, labels = [], []
    for dom, texts in domain_texts(docs, max_tokens).items():
        pos = lm.collect(texts).truncate(max_tokens)
        parts.append(pos)
        labels += [dom] * len(pos.targets)
    if not parts:
        raise SiloInputError("gate.val: no validation text (after decontamination)", "gate.val")
    return PositionBatch.concat(parts), labels


def fit_store_gate(cfg: GateConfig, lm=None, progress: bool = True, save: bool = True) -> tuple[Gate, dict]:
    """Fit the gate of `cfg.store` on `cfg.val` (decontaminated) and save it beside the store."""
    from silo.model.lm import SiloLM

    from .decontam import decontaminate

    say = print if progress else (lambda *a, **k: None)
    lm = lm or SiloLM.load(cfg.model, cfg.store, window=cfg.window, stride=cfg.stride)
    if lm.store is None:
        raise SiloInputError("gate.store: the LM has no datastore attached", "gate.store")
    docs, overlaps = decontaminate(load_documents(cfg.val, cfg.domains), lm.store, keep=cfg.keep_overlap)
    if overlaps:
        say(f"gate: {len(overlaps)} validation document(s) share 13-grams with the store "
            f"({'kept' if cfg.keep_overlap else 'left out'}): "
            + ", ".join(f"{o.document_id} ({o.shared}/{o.total})" for o in overlaps[:10]))
    pos, labels = validation_positions(lm, docs, cfg.max_tokens)
    k_max = max(cfg.k)
    say(f"gate: {len(pos.targets):,} validation positions ({', '.join(sorted(set(labels)))}); "
        f"searching {lm.store.num_entries:,} entries at k={k_max}")
    nb = lm.store.search(pos.keys, k_max)
    gate, report = fit_gate(lm.store, nb, pos, cfg.k, skip=cfg.skip, bos=lm.tokenizer.eos_token_id,
                            labels=np.asarray(labels))
    report["overlaps"] = [o.to_json() for o in overlaps]
    report["validation"] = cfg.val
    labels = np.asarray(labels)
    per = {}
    retr = KNNRetriever(lm.store, gate, lm.vocab_size, bos=lm.tokenizer.eos_token_id)
    mixed = retr.mix_targets(pos, nb)
    every = np.ones(len(labels), bool)
    lam = retr.lambdas(nb, pos.lm, every, retr.recent(nb, pos, every), retr.match(nb, pos.context))
    for dom in sorted(set(labels)):
        m = labels == dom
        per[dom] = {"tokens": int(m.sum()), "parametric": math.exp(-pos.logp_lm[m].mean()),
                    "gated": math.exp(-mixed[m].mean()), "lambda_mean": float(lam[m].mean())}
    report["domains"] = per
    gate.report = report
    for w in report["warnings"]:
        say(f"gate: warning: {w}")
    if save:
        path = gate.save(lm.store.path)
        say(f"gate: k={gate.k}, tau={gate.tau:.4g} (distance scale {gate.tau_ref:.4g}); saved to {path}")
    return gate, report
