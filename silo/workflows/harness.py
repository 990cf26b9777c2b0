"""SILO inside EleutherAI's lm-evaluation-harness: the `silo` model, in-process.

    lm_eval --model silo --model_args config=configs/demo.yaml,mode=knn --tasks TASKS
    lm_eval --model silo --model_args model=runs/demo/model,store=runs/demo/store-served,mode=knn ...

`config` names a SILO config whose `lm:` section gives the model and store and `knn:` the mixture (as
`silo generate` reads it); `model`/`store` override it. `mode` parametric|knn|ric (default knn), and `k`,
`lmbda`, `tau` (the fixed mixture), `skip` (auto|off|a threshold), `device`, `max_gen_toks` (default 256),
`windows` (below); lm_eval's `--batch_size N` is the sequences per scoring pass and per decoding batch
(default 8 where lm_eval passes none or "auto").

What each request type is, in SILO's terms:
- `loglikelihood` (multiple choice): context and continuation are tokenised as lm-eval's own API models
  do (`TemplateLM._encode_pair`; an empty context is BOS), and the sequence is scored by
  `SiloLM.score_ids`: the same path as Score and as the OpenAI door's `echo`, so `local-completions`
  against a SILO server gives the same numbers. `is_greedy` compares each continuation token with the
  most probable token under the same mixture.
- `loglikelihood_rolling` (perplexity): with `windows=sliding` (the default) the document scored by
  `SiloLM.score`, SILO's own protocol (BOS, then sliding windows of the model's context with half of it as
  stride), exactly what Score returns for the text. lm-eval's API models (`local-completions`) cut a long
  document into disjoint windows instead, each starting from one token of context; `windows=disjoint`
  scores those same windows (of `local-completions` with `max_length` = the model's context), so the
  two paths can be compared on documents longer than the context. They agree either way on documents
  that fit the context.
- `generate_until`: greedy (or sampled, with a temperature) continuations through SILO's generation
  path, `batch_size` of them advanced together by one `BatchDecoder`; the prompt is the context's tokens
  as lm-eval's API models send them (no BOS), left-truncated to leave room for `max_gen_toks`.

Registration: importing this module registers `silo` in lm-eval's model registry (`register_model`);
the installed package also carries `silo-lm-eval.pth`, which registers it lazily (this module is imported
only when `--model silo` is used) in the `lm_eval`/`lm-eval` commands, so no change to lm-eval is needed.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from silo.core.config import load_section, read_yaml
from silo.model.batch import BatchDecoder
from silo.model.knn import KNNConfig
from silo.model.lm import SiloLM
from silo.model.request import GenerationRequest, RetrievalParams
from silo.model.sampling import MAX_STOP_CHARS, SamplingParams

log = logging.getLogger("silo.harness")


def load_silo(config: str | None = None, model: str | None = None, store: str | None = None,
              device: str = "auto", mode: str = "knn") -> SiloLM:
    """The SiloLM a config's `lm:` and `knn:` sections describe (`model`/`store` override them)."""
    knn, lm_sec = KNNConfig(), {}
    if config:
        data = read_yaml(config)
        lm_sec = data.get("lm") or {}
        if "knn" in data:
            knn = load_section(config, "knn", KNNConfig)
    model = model or lm_sec.get("model")
    store = store or lm_sec.get("store")
    if not model:
        raise ValueError("silo: give model_args config=CONFIG (with an 'lm' section) or model=MODEL_DIR")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("silo: device %s asked for (lm_eval's default) but torch sees no GPU; using the CPU", device)
        device = "cpu"
    return SiloLM.load(model, None if mode == "parametric" else store, knn=knn,
                       device=device if device not in (None, "auto") else lm_sec.get("device", "auto"))


@register_model("silo")
class SiloEvalLM(TemplateLM):
    """lm-eval's `silo` model: a SiloLM and one retrieval setting (see the module docstring)."""

    def __init__(self, config: str | None = None, model: str | None = None, store: str | None = None,
                 mode: str = "knn", k: int | None = None, lmbda: float | None = None, tau: float | None = None,
                 skip: str | float | None = None, device: str | None = "auto", batch_size: int | str = 8,
                 max_gen_toks: int = 256, max_batch_size: int | None = None, windows: str = "sliding", **unused):
        super().__init__()
        if unused:
            log.warning("silo: ignoring model_args %s", sorted(unused))
        self.lm = load_silo(config, model, store, device or "auto", mode)
        self._batch = int(batch_size) if str(batch_size).isdigit() else 8  # "auto": 8
        self.lm.batch_size = self._batch
        self.params = RetrievalParams(mode=mode, k=k, lmbda=lmbda, tau=tau, skip=skip)
        self.retriever = self.lm.retriever_for(self.params)  # held: one snapshot for the whole run
        self.max_gen_toks = int(max_gen_toks)
        if windows not in ("sliding", "disjoint"):
            raise ValueError(f"silo: windows must be sliding or disjoint (got {windows!r})")
        self.windows = windows

    # ------------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self.lm.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.lm.tokenizer.eos_token_id  # SILO's BOS (what its training documents start with)

    @property
    def max_length(self) -> int:
        return self.lm.context_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lm.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.lm.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        store = getattr(self.retriever, "store", None)
        return {"silo_mode": self.lm.resolve_mode(self.params.mode), "silo_fingerprint": self.lm.fingerprint,
                "silo_store": str(store.path) if store is not None else None,
                "silo_store_generation": store.generation if store is not None else None}

    # ------------------------------------------------------------------------------ requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy?) per request, `batch_size` sequences per scoring pass."""
        out = []
        for i in range(0, len(requests), self._batch):
            chunk = requests[i:i + self._batch]
            seqs = [list(ctx) + list(cont) for _, ctx, cont in chunk]
            for (key, ctx, cont), res in zip(chunk, self.lm.score_ids(seqs, self.retriever, top=1)):
                at = slice(len(ctx) - 1, len(ctx) - 1 + len(cont))  # position t predicts sequence token t + 1
                answer = (float(res.logp[at].sum()), bool((res.top.ids[at, 0] == list(cont)).all()))
                out.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document's log-likelihood: as Score gives it (BOS, sliding windows), or over lm-eval's
        disjoint windows (`windows=disjoint`)."""
        texts = [req.args[0] for req in requests]
        out = []
        for i in range(0, len(texts), self._batch):
            part = texts[i:i + self._batch]
            if self.windows == "disjoint":
                out += [self._disjoint(text) for text in part]
            else:
                out += [float(res.logp.sum()) for res in self.lm.score(part, self.retriever)]
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def _disjoint(self, text: str) -> float:
        """A document over the windows lm-eval's API models send for max_length = the model's context: the
        prefix token and the first context - 2 tokens, then the next context - 2 each after one token."""
        windows = [(None,) + lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
            token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
            max_seq_len=self.lm.context_length - 2, context_len=1)]
        return float(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations up to the first `until` string, `batch_size` generations decoded together."""
        args = [req.args for req in requests]
        out: list[str] = []
        for i in range(0, len(args), self._batch):
            out += self._generate_batch(args[i:i + self._batch])
        for (context, kwargs), text in zip(args, out):
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return out

    def _generate_batch(self, args) -> list[str]:
        decoder = BatchDecoder(self.lm)
        seqs, untils = [], []
        for context, kwargs in args:
            request, until = self._request(context, dict(kwargs or {}))
            seqs.append(self.lm.start(request, retriever=self.retriever, attribute=False))
            untils.append(until)
        decoder.add_many(seqs)
        while decoder.active:
            decoder.step()
        return [_cut(seq.completion.text, until) for seq, until in zip(seqs, untils)]

    def _request(self, context: str, kwargs: dict) -> tuple[GenerationRequest, list[str]]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        # as lm-eval's own models (and local-completions) send it: the context's tokens, BOS only for an empty one
        ids = self.lm.encode(context) or [self.prefix_token_id]
        ids = ids[-max(1, self.lm.context_length - max_new):]  # left-truncated to leave room, as they do
        stops = tuple(s for s in until if 1 <= len(s) <= MAX_STOP_CHARS)  # longer ones are cut afterwards
        sampling = SamplingParams(max_new_tokens=max_new, temperature=temperature, stop=stops,
                                  seed=kwargs.pop("seed", None))
        return GenerationRequest(prompt_ids=ids, sampling=sampling, retrieval=self.params), until


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first of the `until` strings."""
    for s in until:
        if s and s in text:
            text = text[:text.index(s)]
    return text
