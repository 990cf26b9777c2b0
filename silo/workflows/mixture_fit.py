"""Maximum-likelihood fitting of the kNN-LM mixture, in a parameterisation that cannot overflow.

One objective serves both mixtures: the log-likelihood of the validation tokens under

    p(y) = lambda * p_kNN(y; tau) + (1 - lambda) * p_LM(y),   lambda = lambda_max * sigmoid(w . x + b)

maximised over (w, b, log tau, tau slope, match bonus) with L-BFGS from one search at the largest k. With
no features it is the fixed mixture (lambda = lambda_max * sigmoid(b), the paper's protocol); with the
gate's standardised features it is the per-token gate (silo/model/gate.py).

Why each bound (a user's store is not the demo's, and a fit must not be able to make the mixture worse
than the LM alone):
* lambda < lambda_max < 1: p_LM always keeps a share, so a token outside the neighbours costs at most
  -log(1 - lambda_max) nats, never -inf;
* tau = tau_ref * exp(LOG_TAU_SPAN * tanh(.)), its slope and the match bonus through tanh too, and each
  row's tau clamped to tau_ref * exp(+-TAU_LOG_RANGE): no exp() of the fit can overflow, whatever the
  store's distance scale;
* a prior: the gate's weights are pulled towards 0 and its bias and tau towards the fixed mixture's, with
  a strength that falls as 1 / positions. With few or one-sided validation positions the gate stays near
  the tuned fixed lambda; with many, the data decide;
* a guard (`Guard`): the promise "never worse than the LM alone" is part of the objective, not only of the
  final check: each domain's mean NLL beyond the LM's own (less a slack) is penalised, so one domain's
  gain cannot be bought with another's loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from silo.datastore.store import Neighbors
from silo.model.gate import LAMBDA_MAX, MATCH_BONUS_MAX, TAU_LOG_RANGE, TAU_SLOPE_MAX, tau_log_ratio
from silo.model.types import PositionBatch

L2 = 1e-3  # weight decay on the gate's feature weights (features are standardised)
LOG_TAU_SPAN = 8.0  # tau is searched within tau_ref * exp(+-LOG_TAU_SPAN)
PRIOR = 50.0  # prior strength in positions: the penalty on a parameter's distance from its prior is PRIOR / n
GUARD = 10.0  # weight of the per-domain guard: nats of penalty per nat a domain loses beyond its slack
GUARD_SHARPNESS = 400.0  # the guard is softplus(sharpness * excess) / sharpness: a hinge ~0.003 nats wide


class GateFitError(ValueError):
    """A fit that produced a non-finite value or failed its final check (nothing is saved)."""


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
    lambda_max: float = LAMBDA_MAX

    @property
    def lmbda(self) -> float:  # the fixed mixture's lambda
        return self.lambda_max / (1.0 + math.exp(-self.bias))


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)


def mixture_logp(D, valid, hit, logp_lm, have, X, w, b, log_tau, bonus=None, lambda_max=LAMBDA_MAX) -> torch.Tensor:
    """log p(target) per row under the mixture (torch, differentiable). `log_tau` is one number or one per
    row; `bonus` [n, <=k] is added to the first neighbours' logits; lambda = lambda_max * sigmoid(z)."""
    log_tau = log_tau if log_tau.dim() == 0 else log_tau[:, None]
    a = -D / torch.exp(log_tau)
    if bonus is not None and bonus.shape[1]:
        m = min(bonus.shape[1], a.shape[1])
        a = torch.cat([a[:, :m] + bonus[:, :m], a[:, m:]], dim=1)
    neg = torch.tensor(-1e30, dtype=a.dtype)
    lse_all = torch.logsumexp(torch.where(valid, a, neg), dim=1)
    lse_hit = torch.logsumexp(torch.where(hit, a, neg), dim=1)
    return gated_logp(lse_hit - lse_all, logp_lm, have, X, w, b, lambda_max)


def gated_logp(log_pret, logp_base, have, X, w, b, lambda_max=LAMBDA_MAX) -> torch.Tensor:
    """log(lambda * p_ret + (1 - lambda) * p_base) per row, lambda = lambda_max * sigmoid(X w + b) (torch,
    differentiable); the base alone where `have` is false. Shared by kNN-LM's mixture (p_ret = p_kNN) and
    the inf-gram's (p_ret = p_inf, silo.workflows.infgram_fit)."""
    z = (X @ w if X.shape[1] else torch.zeros_like(logp_base)) + b
    log_lam = math.log(lambda_max) + torch.nn.functional.logsigmoid(z)
    # log(1 - lambda_max * sigmoid(z)) = log(1 - lambda_max + e^-z) - log(1 + e^-z), stable at any z
    log_rest = torch.logaddexp(torch.tensor(math.log1p(-lambda_max), dtype=z.dtype), -z) - torch.nn.functional.softplus(-z)
    mixed = torch.logaddexp(log_lam + log_pret, log_rest + logp_base)
    return torch.where(have, mixed, logp_base)


def fit_lambda(log_pret: np.ndarray, logp_base: np.ndarray, X: np.ndarray, have: np.ndarray,
               prior: Prior | None = None, lambda_max: float = LAMBDA_MAX, guard: Guard | None = None,
               max_iter: int = 60) -> Fit:
    """Maximum-likelihood (w, b) of lambda = lambda_max * sigmoid(X w + b) for a retrieval distribution
    whose log-probability of each target is given (`log_pret`, -inf where it has none): the same bounded
    objective, prior and guard as `fit_mixture`, without kNN's bandwidth. X [n, 0] fits a fixed lambda."""
    prior = prior or Prior(bias=math.log(0.2 / (lambda_max - 0.2)))
    lr, lp, have_t, Xt = _t(np.maximum(log_pret, -1e30)), _t(logp_base), _t(have, torch.bool), _t(X)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(prior.bias, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = gated_logp(lr, lp, have_t, Xt, w, b, lambda_max)
        pull = L2 * (w ** 2).sum() + prior.strength * ((w ** 2).sum() + (b - prior.bias) ** 2)
        loss = -logp.mean() + pull + (guard.penalty(logp, lp) if guard is not None else 0.0)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll = float(-gated_logp(lr, lp, have_t, Xt, w, b, lambda_max).mean())
    fit = Fit(k=0, tau=1.0, weights=w.detach().numpy().copy(), bias=float(b.detach()), nll=nll, lambda_max=lambda_max)
    if not all(math.isfinite(v) for v in [nll, fit.bias, *fit.weights.tolist()]):
        raise GateFitError(f"the inf-gram mixture fit produced a non-finite value (nll {nll}, bias {fit.bias}); "
                           "nothing is saved")
    return fit


def mixture_nll(*args, **kw) -> torch.Tensor:
    """Mean negative log-likelihood of the targets under the mixture (see `mixture_logp`)."""
    return -mixture_logp(*args, **kw).mean()


@dataclass
class Prior:
    """Where the gate's parameters are pulled to: the fixed mixture's bias and tau, zero weights."""

    bias: float = 0.0
    raw_tau: float = 0.0  # tanh^-1 of (log tau - log tau_ref) / LOG_TAU_SPAN
    strength: float = 0.0  # penalty per squared unit of distance from the prior

    @classmethod
    def of(cls, fit: "Fit", tau_ref: float, n: int) -> "Prior":
        frac = np.clip((math.log(fit.tau) - math.log(tau_ref)) / LOG_TAU_SPAN, -0.999, 0.999)
        return cls(bias=fit.bias, raw_tau=float(np.arctanh(frac)), strength=PRIOR / max(n, 1))


@dataclass
class Guard:
    """Per-domain guard of a fit: each position's domain (0..G-1) and each domain's allowed excess NLL over
    the LM alone (nats)."""

    groups: np.ndarray
    slack: np.ndarray

    def rows(self, sel) -> "Guard":
        return Guard(self.groups[sel], self.slack)

    def penalty(self, logp_mix: torch.Tensor, logp_lm: torch.Tensor) -> torch.Tensor:
        g = torch.as_tensor(self.groups, dtype=torch.long)
        n = torch.zeros(len(self.slack), dtype=logp_mix.dtype).index_add_(0, g, torch.ones_like(logp_mix))
        loss = torch.zeros_like(n).index_add_(0, g, logp_lm - logp_mix) / n.clamp(min=1)
        excess = GUARD_SHARPNESS * (loss - _t(self.slack))
        return GUARD * (torch.nn.functional.softplus(excess) / GUARD_SHARPNESS * (n > 0)).sum()


def _tensors(nb: Neighbors, targets: np.ndarray, k: int):
    tok = nb.tokens[:, :k]
    valid = tok >= 0
    return _t(np.where(valid, nb.distances[:, :k], 0.0)), _t(valid, torch.bool), _t(valid & (tok == targets[:, None]), torch.bool)


def fit_mixture(nb: Neighbors, targets: np.ndarray, logp_lm: np.ndarray, X: np.ndarray, have: np.ndarray, k: int,
                tau_ref: float, max_iter: int = 60, variable_tau: bool = False, match: np.ndarray | None = None,
                prior: Prior | None = None, lambda_max: float = LAMBDA_MAX, guard: Guard | None = None) -> Fit:
    """Maximum-likelihood (w, b, tau) for the first k neighbours; X [n, F] standardised features (F may be 0).
    With `variable_tau`, tau = tau0 * (d1 / tau_ref) ** slope and the slope is fitted too; with `match`
    (context-match lengths of the first neighbours) a per-token bonus on their logits is fitted too. Every
    parameter is bounded (module docstring); `prior` (default: a small lambda, tau_ref) is the start and,
    with its strength, the pull; `guard` penalises each domain's loss against the LM alone."""
    prior = prior or Prior(bias=math.log(0.2 / (lambda_max - 0.2)))
    D, valid_t, hit = _tensors(nb, targets, k)
    lp, have_t, Xt = _t(logp_lm), _t(have, torch.bool), _t(X)
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(prior.bias, dtype=torch.float64, requires_grad=True)
    raw = torch.tensor(prior.raw_tau, dtype=torch.float64, requires_grad=True)
    raw_slope = torch.tensor(0.0, dtype=torch.float64, requires_grad=variable_tau)
    raw_bonus = torch.tensor(0.0, dtype=torch.float64, requires_grad=match is not None)
    ratio = _t(tau_log_ratio(nb.distances[:, 0], tau_ref)) if variable_tau else None
    M = _t(match[:, :k]) if match is not None else None
    lo, hi = math.log(tau_ref) - TAU_LOG_RANGE, math.log(tau_ref) + TAU_LOG_RANGE

    def log_tau():
        base = math.log(tau_ref) + LOG_TAU_SPAN * torch.tanh(raw)
        return torch.clamp(base + TAU_SLOPE_MAX * torch.tanh(raw_slope) * ratio, lo, hi) if variable_tau else base

    def bonus():
        return None if M is None else MATCH_BONUS_MAX * torch.tanh(raw_bonus) * M

    def penalty():
        pull = (w ** 2).sum() + (b - prior.bias) ** 2 + (raw - prior.raw_tau) ** 2 + raw_slope ** 2 + raw_bonus ** 2
        return L2 * (w ** 2).sum() + prior.strength * pull

    params = [w, b, raw] + ([raw_slope] if variable_tau else []) + ([raw_bonus] if match is not None else [])
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logp = mixture_logp(D, valid_t, hit, lp, have_t, Xt, w, b, log_tau(), bonus(), lambda_max)
        loss = -logp.mean() + penalty() + (guard.penalty(logp, lp) if guard is not None else 0.0)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        nll = float(mixture_nll(D, valid_t, hit, lp, have_t, Xt, w, b, log_tau(), bonus(), lambda_max))
        tau = float(torch.exp(math.log(tau_ref) + LOG_TAU_SPAN * torch.tanh(raw)))
    fit = Fit(k=k, tau=tau, weights=w.detach().numpy().copy(), bias=float(b.detach()), nll=nll,
              tau_slope=TAU_SLOPE_MAX * math.tanh(float(raw_slope.detach())),
              match_bonus=MATCH_BONUS_MAX * math.tanh(float(raw_bonus.detach())), lambda_max=lambda_max)
    values = [nll, tau, fit.bias, fit.tau_slope, fit.match_bonus, *fit.weights.tolist()]
    if not all(math.isfinite(v) for v in values) or tau <= 0:
        raise GateFitError(f"the mixture fit at k={k} produced a non-finite value (nll {nll}, tau {tau}, bias "
                           f"{fit.bias}); nothing is saved")
    if abs(math.tanh(float(raw.detach()))) > 0.99:
        fit.warnings.append(f"tau {tau:.4g} is at the edge of its search range (tau_ref {tau_ref:.4g} x e^+-"
                            f"{LOG_TAU_SPAN:g})")
    return fit


def distance_scale(nb: Neighbors) -> float:
    """Median nearest-neighbour distance of these positions (the fixed mixture's tau search centre)."""
    d1 = nb.distances[:, 0] if nb.distances.shape[1] else np.zeros(0)
    d1 = d1[np.isfinite(d1) & (nb.tokens[:, 0] >= 0)] if len(d1) else d1
    return float(np.median(d1)) if len(d1) and np.median(d1) > 0 else 1.0


def choose_k(ks: list[int], fit_one, held_nll) -> tuple[int, list[dict], list[str], dict]:
    """Fit on one half for each k, keep the k with the best held-out NLL; warn when it is an end of the list.
    Returns (k, rows, warnings, the fits by k)."""
    rows, fits = [], {}
    for k in ks:
        fits[k] = f = fit_one(k)
        rows.append({"k": k, "fit_nll": f.nll, "held_nll": held_nll(f)})
    best = min(rows, key=lambda r: r["held_nll"])["k"]
    warns = []
    if len(ks) > 1 and best == max(ks):
        warns.append(f"k {best} is the largest value tried ({ks}); a larger k may fit better")
    if len(ks) > 1 and best == min(ks):
        warns.append(f"k {best} is the smallest value tried ({ks})")
    return best, rows, warns, fits


def halves(n: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Alternate blocks of consecutive positions: two halves that both cover every domain."""
    a = (np.arange(n) // block) % 2 == 0
    return a, ~a


def _lambda_warnings(fit: Fit) -> list[str]:
    if fit.lmbda > 0.98 * fit.lambda_max:
        return [f"lambda {fit.lmbda:.3f} is at its upper bound ({fit.lambda_max:g}): the store carries nearly "
                "everything"]
    return []


def fixed_logp(nb: Neighbors, targets: np.ndarray, logp_lm: np.ndarray, f: Fit) -> np.ndarray:
    """log p(target) per position under the fixed mixture `f`."""
    D, valid, hit = _tensors(nb, targets, f.k)
    have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(targets), bool)
    with torch.no_grad():
        return mixture_logp(D, valid, hit, _t(logp_lm), _t(have, torch.bool), _t(np.zeros((len(targets), 0))),
                            torch.zeros(0, dtype=torch.float64), torch.tensor(f.bias, dtype=torch.float64),
                            torch.tensor(math.log(f.tau), dtype=torch.float64), lambda_max=f.lambda_max).numpy()


def fit_fixed(nb: Neighbors, pos: PositionBatch, ks: list[int], tau_ref: float, sel=None,
              lambda_max: float = LAMBDA_MAX) -> tuple[Fit, list[dict]]:
    """The fixed mixture (one lambda, one tau) for these positions (`sel`: a subset), k chosen on a
    held-out half of them."""
    idx = np.arange(len(pos.targets)) if sel is None else np.flatnonzero(np.ones(len(pos.targets), bool)[sel])
    have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(pos.targets), bool)
    X = np.zeros((len(pos.targets), 0))
    A, B = halves(len(idx))

    def fit_on(rows, k):
        return fit_mixture(nb.rows(rows), pos.targets[rows], pos.logp_lm[rows], X[rows], have[rows], k, tau_ref,
                           lambda_max=lambda_max)

    def held(f: Fit) -> float:
        return float(-fixed_logp(nb.rows(idx[B]), pos.targets[idx[B]], pos.logp_lm[idx[B]], f).mean())

    ks = [k for k in ks if k <= nb.tokens.shape[1]] or [nb.tokens.shape[1]]
    best, rows, warns, _ = choose_k(ks, lambda k: fit_on(idx[A], k), held)
    fit = fit_on(idx, best)
    fit.warnings = warns + fit.warnings + _lambda_warnings(fit)
    return fit, rows
