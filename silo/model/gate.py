"""How much to trust the datastore at each token: the mixture weight lambda of kNN-LM.

A fixed lambda (Khandelwal et al.) trusts the store as much when it holds nothing relevant as when it
holds the very passage being read; on text the store does not hold that makes the mixture worse than the
LM alone. The `Gate` decides lambda per token from evidence, in the spirit of Drozdov et al. (2022,
lambda from retrieval quality) and He et al. (2021, from the LM's own state):

    lambda(x) = lambda_max * sigmoid(w . clip(standardise(features(x))) + b),   lambda_max < 1

with features (all cheap, computed from one search and the LM's distribution):

    log_d1       log of the nearest neighbour's squared distance, in units of the store's distance scale
    log_d_mean   log of the mean distance of the 16 nearest
    agree_top1   weight of the neighbours whose next token is the nearest's (they agree)
    agree_lm     weight of the neighbours whose next token is the LM's own top choice
    doc_share    weight of the neighbours from the nearest's document (a passage, not scattered words)
    lm_entropy   entropy of the LM's next-token distribution
    lm_top_p     the LM's top probability
    recent_gain  how much better than the LM the store predicted the tokens just before this one:
                 an exponential moving average (decay 0.95) of log p_kNN(y) - log p_LM(y) (clipped to
                 +-10) over the previous positions of the same text (in generation: the prompt and the
                 tokens generated so far). Text the store does not hold gives a negative value after a few
                 tokens, a quote from the store a large positive one: evidence about the passage, not the token
    history      how many earlier positions that average holds (its EMA weight, 0 at the start of a text)
    match_top1   how many of the tokens before the nearest neighbour equal the query's own (of 8; the
                 datastore's entries give each neighbour's context): the same passage, not just a similar state
    match_max    the longest such match among the 64 nearest

(weights are softmax(-d / tau_ref) over the k neighbours). The same context match also enters p_kNN: a
neighbour whose last m tokens match gets exp(match_bonus * m) more weight, so a passage the store holds
verbatim is continued from its own next token. match_bonus, like tau and the weights, is fitted. The gate is fitted by maximum likelihood on
validation text (silo.workflows.gate_fit), saved beside the store (`gate.json`, tied to the model
fingerprint and the generation it was fitted on) and read by every user of the mixture. Because it reads
distances, lambda falls by itself when the content a text needs leaves the store (an opt-out): no
re-tuning. Where a search returns no neighbour (an empty store) lambda is 0: the LM alone.

`min_lambda`: below this the store is not used at all (lambda 0). Maximum likelihood rewards a small
hedge towards a peaked p_kNN wherever the LM is unsure, which costs next to nothing in perplexity but,
where the LM is flat, is enough to flip a greedy choice towards the store's text (a dictionary headword
after a blank line of Python documentation). The floor is fitted on validation as the largest value that
keeps every domain's perplexity within a tolerance of the unfloored gate, and it applies wherever the
mixture does (scoring, evaluation, generation, attribution).

Safety on a store it was not made for (silo.workflows.gate_fit): lambda_max < 1 keeps p_LM in every
token's mixture; features are clipped after standardising; each row's tau stays within tau_ref *
exp(+-TAU_LOG_RANGE); and a fit that fails its final check is saved as a named weaker mixture (`mode`
"fixed": one lambda wherever the store answers; "parametric": the store unused) with the reason in
`fallback`, which `silo datastore info` and `silo eval` print.

`SkipPredictor` (He et al. 2021's adaptive retrieval) predicts the gate's lambda from the LM's state
alone, before searching; where it is below a threshold the search is skipped and lambda is 0.
"""

from __future__ import annotations

import json
from functools import cached_property
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from silo.core.files import write_json_atomic
from silo.datastore.format import GATE_FILE
from silo.datastore.store import Datastore, Neighbors

from .evidence import MATCH_K, RecentGain, recent_gain, token_gain  # noqa: F401  (re-exported)
from .knn import FixedMixture, neighbor_log_weights  # noqa: F401  (FixedMixture: re-exported)
from .types import CONTEXT, LMState, SiloInputError

# v2 added min_lambda (a v1 gate reads as min_lambda 0); v3 names p_kNN's bandwidth `tau` (v1/v2: `temperature`);
# v4 adds lambda_max, mode (what is served: the gate, or a named fallback), fixed_lambda, fallback and
# scale_source (a v1-v3 gate reads as a gate with lambda_max LEGACY_LAMBDA_MAX)
GATE_FORMAT = "silo.gate.v4"
READ_FORMATS = ("silo.gate.v1", "silo.gate.v2", "silo.gate.v3", GATE_FORMAT)
MODES = ("gated", "fixed", "parametric")
LAMBDA_MAX = 0.95  # lambda's upper bound in a fit: p_LM keeps at least 5% of every token's mixture
LEGACY_LAMBDA_MAX = 0.99  # the bound read into a gate saved before lambda had one (v1-v3)
TAU_SLOPE_MAX = 2.0  # |tau_slope|: tau follows (d1 / tau_ref) ** slope
MATCH_BONUS_MAX = 2.0  # |match_bonus| per matching context token
TAU_LOG_RANGE = 12.0  # each row's tau stays within tau_ref * exp(+-TAU_LOG_RANGE)
FEATURE_CLIP = 8.0  # standardised features are clipped to +-this: text unlike the validation cannot overflow
STD_FLOOR = 0.05  # a feature's standardising scale is at least this (a near-constant one cannot blow up)
FEATURES = ("log_d1", "log_d_mean", "agree_top1", "agree_lm", "doc_share", "lm_entropy", "lm_top_p", "recent_gain",
            "history", "match_top1", "match_max")
def knn_features(nb: Neighbors, doc_keys: np.ndarray, lm: LMState, k: int, tau_ref: float,
                 recent: np.ndarray, match: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gate features [n, len(FEATURES)] and a mask of rows that have at least one neighbour.
    `doc_keys` [n, >=k]: a document key per neighbour (`Datastore.doc_keys`); `recent` [n, 2]: the
    recent-gain average and its history weight (`recent_gain`, `RecentGain`); `match` [n, <=MATCH_K]:
    context-match lengths (`Datastore.context_match`)."""
    d = nb.distances[:, :k].astype(np.float64)
    t = nb.tokens[:, :k]
    n = len(d)
    valid = t >= 0
    have = valid[:, 0] if d.shape[1] else np.zeros(n, bool)
    out = np.zeros((n, len(FEATURES)))
    if not have.any():
        return out, have
    dd = np.where(valid, d, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, 0] = np.log(np.maximum(np.where(have, d[:, 0], tau_ref), 1e-8) / tau_ref)
        m = min(k, 16)
        mean = np.nanmean(np.where(have[:, None], dd[:, :m], tau_ref), axis=1)
        out[:, 1] = np.log(np.maximum(mean, 1e-8) / tau_ref)
        w = np.exp(neighbor_log_weights(d, t, tau_ref))
    w = np.where(valid, w, 0.0)
    out[:, 2] = (w * (t == t[:, :1])).sum(1)
    out[:, 3] = (w * (t == lm.top_token[:, None])).sum(1)
    out[:, 4] = (w * (doc_keys[:, :k] == doc_keys[:, :1])).sum(1)
    out[:, 5] = lm.entropy
    out[:, 6] = lm.top_p
    out[:, 7:9] = recent
    if match.shape[1]:
        out[:, 9] = match[:, 0] / CONTEXT
        out[:, 10] = match.max(1) / CONTEXT
    out[~have] = 0.0
    return out, have


TAU_LOG_CLIP = 6.0


def tau_log_ratio(d1: np.ndarray, tau_ref: float) -> np.ndarray:
    """log(d1 / tau_ref), clipped to +-TAU_LOG_CLIP (0 where there is no neighbour)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(np.maximum(d1, 1e-12) / tau_ref)
    return np.clip(np.where(np.isfinite(r), r, 0.0), -TAU_LOG_CLIP, TAU_LOG_CLIP)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


@dataclass
class SkipPredictor:
    """Predicts the gate's lambda from the LM's state alone (hidden state, entropy, top probability)."""

    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    threshold: float = 0.0  # skip the search where the prediction is below this (0: never skip)
    curve: list[dict] = field(default_factory=list)  # validation: threshold -> skipped share, perplexity

    def inputs(self, keys: np.ndarray, lm: LMState) -> np.ndarray:
        return np.concatenate([keys.astype(np.float64), lm.entropy[:, None], lm.top_p[:, None]], axis=1)

    @cached_property
    def _folded(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The standardisation folded into the weights (key weights, LM-feature weights, bias), once."""
        w = np.asarray(self.weights) / np.asarray(self.std)
        return w[:-2].astype(np.float32), w[-2:], self.bias - float(np.asarray(self.mean) @ w)

    def predict(self, keys: np.ndarray, lm: LMState) -> np.ndarray:
        wk, wl, b = self._folded
        z = (keys.astype(np.float32, copy=False) @ wk).astype(np.float64) + lm.entropy * wl[0] + lm.top_p * wl[1] + b
        return _sigmoid(z)


@dataclass
class Gate:
    """A fitted per-token lambda (see the module docstring)."""

    k: int
    tau: float  # tau of p_kNN at a nearest distance of tau_ref ...
    tau_ref: float  # the store's distance scale: unit of the distance features and tau of their weights
    tau_slope: float  # ... and tau * (d1 / tau_ref) ** tau_slope elsewhere (a variable bandwidth)
    match_bonus: float  # added to a neighbour's logit per matching context token
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float
    fingerprint: str = ""
    generation: int = 0  # store generation it was fitted on
    fitted: str = ""
    report: dict = field(default_factory=dict)  # validation figures of the fit
    skip: SkipPredictor | None = None
    min_lambda: float = 0.0  # lambda below this is 0: the store is not used there (fitted; see the docstring)
    format: str = GATE_FORMAT  # the format it was read from (a v1 gate is older than the floor)
    lambda_max: float = LEGACY_LAMBDA_MAX  # lambda = lambda_max * sigmoid(...): p_LM always keeps a share
    mode: str = "gated"  # what is served: "gated", or a fallback that passed the fit's final check:
    # "fixed" (fixed_lambda everywhere the store answers) or "parametric" (the store is not used)
    fixed_lambda: float = 0.0
    fallback: str = ""  # why the fit fell back to `mode` (empty for a gate)
    scale_source: str = "validation"  # where tau_ref came from: "store" (its own keys) or "validation"
    kind: str = "gated"

    def taus(self, nb: Neighbors) -> np.ndarray:
        """tau per row: a bandwidth that follows the nearest distance (sharp on a near-verbatim match),
        within tau_ref * exp(+-TAU_LOG_RANGE) whatever the slope."""
        d1 = nb.distances[:, 0].astype(np.float64) if nb.distances.shape[1] else np.full(len(nb.distances), np.inf)
        log_ref = np.log(self.tau_ref)
        log_tau = np.log(self.tau) + self.tau_slope * tau_log_ratio(d1, self.tau_ref)
        return np.exp(np.clip(log_tau, log_ref - TAU_LOG_RANGE, log_ref + TAU_LOG_RANGE))

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = np.clip((features - np.asarray(self.mean)) / np.asarray(self.std), -FEATURE_CLIP, FEATURE_CLIP)
        return x @ np.asarray(self.weights) + self.bias

    needs_history = True

    def bonus(self, match: np.ndarray | None) -> np.ndarray | None:
        return None if match is None else self.match_bonus * match

    def lambdas(self, nb: Neighbors, store: Datastore, lm: LMState | None, recent: np.ndarray | None = None,
                match: np.ndarray | None = None) -> np.ndarray:
        if lm is None or recent is None or match is None:
            raise SiloInputError("the gated mixture needs the LM's state, the recent gain and the context match "
                                 "at each position", "lm")
        if self.mode == "parametric":
            return np.zeros(len(nb.tokens))
        if self.mode == "fixed":
            have = nb.tokens[:, 0] >= 0 if nb.tokens.shape[1] else np.zeros(len(nb.tokens), bool)
            return np.where(have, self.fixed_lambda, 0.0)
        f, have = knn_features(nb, store.doc_keys(nb), lm, self.k, self.tau_ref, recent, match)
        return self.floor(np.where(have, self.lambda_max * _sigmoid(self.logits(f)), 0.0))

    def floor(self, lam: np.ndarray) -> np.ndarray:
        """lambda with values below `min_lambda` set to 0."""
        return np.where(lam >= self.min_lambda, lam, 0.0) if self.min_lambda > 0 else lam

    def describe(self) -> dict:
        if self.mode != "gated":
            return {"mixture": "gated", "mode": self.mode, "fallback": self.fallback, "k": self.k,
                    "lmbda": self.fixed_lambda, "tau": self.tau, "generation": self.generation, "fitted": self.fitted}
        return {"mixture": "gated", "mode": "gated", "k": self.k, "tau": self.tau, "tau_ref": self.tau_ref,
                "scale_source": self.scale_source, "lambda_max": self.lambda_max,
                "tau_slope": self.tau_slope, "match_bonus": self.match_bonus, "min_lambda": self.min_lambda,
                "weights": dict(zip(FEATURES, self.weights)), "bias": self.bias, "generation": self.generation,
                "fitted": self.fitted, "skip_threshold": self.skip.threshold if self.skip else None}

    # ----------------------------------------------------------------------------------- file
    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("kind")
        out["format"] = GATE_FORMAT
        out["features"] = list(FEATURES)
        return out

    def save(self, store_path: str | Path) -> Path:
        path = Path(store_path) / GATE_FILE
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, store: Datastore | str | Path) -> "Gate | None":
        """The gate saved beside `store`, or None. Refuses a gate fitted for another model."""
        path = Path(store.path if isinstance(store, Datastore) else store) / GATE_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") not in READ_FORMATS or data.get("features") != list(FEATURES):
            raise SiloInputError(f"{path}: not a {GATE_FORMAT} gate with features {FEATURES}; fit it again "
                                 "with `silo datastore fit-gate`", "gate")
        if isinstance(store, Datastore) and data.get("fingerprint") != store.fingerprint:
            raise SiloInputError(f"{path}: fitted for model {str(data.get('fingerprint'))[:23]}..., the store is for "
                                 f"{store.fingerprint[:23]}...; fit it again with `silo datastore fit-gate`", "gate")
        skip = data.pop("skip", None)
        data.pop("features", None)
        if "temperature" in data:  # v1, v2
            data["tau"] = data.pop("temperature")
        if data.get("mode", "gated") not in MODES:
            raise SiloInputError(f"{path}: mode must be one of {', '.join(MODES)} (got {data.get('mode')!r})", "gate")
        gate = cls(**data)
        gate.skip = SkipPredictor(**skip) if skip else None
        return gate

