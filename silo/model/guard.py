"""The verbatim guard: keeps a generation from repeating more of one store document than its output policy
allows (`max_verbatim_chars` of the document's tier / owner, silo/model/output_policy.py), and keeps
documents that may not be surfaced (`allow: false`) out of the generation mixture.

One guard follows ONE sequence; its per-step interface is all a generation loop (single or batched) needs:

    guard = VerbatimGuard(store, policy, token_texts)      # or SiloLM.guard(retriever, policy)
    for each step:
        exclude = guard.exclude()        # document keys whose neighbours the mixture must drop this step
        p = mixture(..., exclude)        # KNNRetriever.next_token(..., exclude=[exclude, ...])
        p = guard.adjust(p)              # before sampling: tokens that would break a cap get probability 0
        token = sample(p)
        guard.observe(text, documents)   # after it: the completion so far, documents that carried the step

What it tracks: for each capped document in play (the documents of the step's neighbours or RIC blocks,
kept while their overlap continues), the longest suffix of the completion that occurs verbatim in the
document's stored text (exact substring search, silo/model/verbatim.py). Before a step, for each such
document it computes exactly which tokens would extend an overlap past the cap: a span longer than the
cap that ends inside token y is a suffix of the completion followed by a prefix of y, so it continues one
of the occurrences in the document of the completion's last characters; the tokens that start with the
document's text after such an occurrence (found by a prefix search over the sorted token texts) are the
ones to block, and the few tokens longer than that window are checked one by one. That document's
neighbours are dropped from the mixture for the step and the blocked tokens get probability 0 (a
`GuardEvent` records it), so the longest verbatim span of the completion stays within the cap. A token's
text is taken as it decodes after a word (`TokenTexts.of`); the spans themselves are always measured on
the decoded completion.

Training documents (with the model's training-data index, silo.training.index): after each token the guard
finds the longest run of generated tokens that occurs in the training stream (the suffix array, growing by
at most one token a step); once it is TRAINING_FOLLOW_TOKENS long and occurs at most TRAINING_FOLLOW_MAX
times, the documents it occurs in are followed like a neighbour's document, under their own tier's and
owner's caps (a training document the policy does not allow to surface is capped at MIN_CAP characters:
its text is in the weights and cannot be dropped from a mixture). The parametric model is guarded this way
too.

Not seen: documents that never show up among the neighbours (or RIC blocks) while the overlap grows, training
documents whose text the completion repeats with another tokenization than the training stream's, and
spans that start in the prompt (only the completion is measured).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import torch

from silo.datastore.format import StoredDocument

from .output_policy import MIN_CAP, OutputPolicy
from .verbatim import SuffixMatch

TRAINING = 1 << 30  # the "shard" of training documents in document keys (a store never has this many shards)
TRAINING_FOLLOW_TOKENS = 4  # a run of generated tokens this long found in the training data is followed ...
TRAINING_FOLLOW_MAX = 256  # ... once it occurs at most this often (its documents are then few)


class TokenTexts:
    """Every token's text decoded on its own, sorted for prefix search."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        order = sorted(range(len(texts)), key=texts.__getitem__)
        self._sorted = [texts[i] for i in order]
        self._order = np.asarray(order, dtype=np.int64)
        self.lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "TokenTexts":
        """Each token's text as it reads after a word: decoded behind an anchor token, so that tokenizers
        which drop a leading space when a token is decoded alone (SentencePiece) give it back."""
        n = min(vocab_size, len(tokenizer))
        anchor = tokenizer.encode("a", add_special_tokens=False)[:1]
        head = tokenizer.decode(anchor) if anchor else ""
        texts = []
        for i in range(n):
            both = tokenizer.decode(anchor + [i]) if anchor else ""
            texts.append(both[len(head):] if head and both.startswith(head) else tokenizer.decode([i]))
        return cls(texts + [""] * (vocab_size - n))

    def starting_with(self, prefix: str) -> np.ndarray:
        lo = bisect_left(self._sorted, prefix)
        hi = bisect_left(self._sorted, prefix + "\U0010ffff", lo)
        return self._order[lo:hi]

    def longer_than(self, n: int) -> np.ndarray:
        return np.flatnonzero(self.lengths > n)


@dataclass
class GuardEvent:
    """The guard steered one step away from a document."""

    offset: int  # characters of completion before the step
    document_id: str
    owner: str
    shard: str
    span: int  # characters of the document the completion ended with, verbatim
    cap: int  # the document's max_verbatim_chars
    blocked_tokens: int  # tokens that would have taken the span past the cap
    blocked_mass: float  # their probability before the guard removed it


def doc_key(shard: int, doc: int) -> int:
    """The store-wide document key of silo.datastore.store.Datastore.doc_keys."""
    return (int(shard) << 32) | int(doc)


class VerbatimGuard:
    FOLLOW_MIN = 8  # a document whose overlap falls below this is no longer followed (unless retrieved again)

    def __init__(self, store, policy: OutputPolicy, tokens: TokenTexts, training=None):
        self.store = store  # None: no datastore (the parametric model, guarded on its training data)
        self.training = training  # silo.training.index.TrainingIndex, or None
        self._ids: list[int] = []  # the completion's tokens (for the training-data index)
        self._run = 0  # how many of them, ending at the last, occur in the training stream
        self.policy = policy
        self.tokens = tokens
        self.text = ""  # the completion so far
        self.events: list[GuardEvent] = []
        self.longest: dict[int, int] = {}  # document key -> longest verbatim span seen (capped documents)
        self._follow: dict[int, SuffixMatch] = {}
        self._caps: dict[int, int | None] = {}
        self._denied = self._denied_keys()
        self._plan: dict[int, np.ndarray] | None = None

    def _doc(self, key: int) -> StoredDocument:
        if key >> 32 == TRAINING:
            return self.training.document(key & 0xFFFFFFFF)
        return self.store.shards[key >> 32].documents[key & 0xFFFFFFFF]

    def _shard_name(self, key: int) -> str:
        return "training" if key >> 32 == TRAINING else self.store.shards[key >> 32].name

    def _denied_keys(self) -> np.ndarray:
        if self.store is None or all(r.allow for r in (self.policy.all, *self.policy.tiers.values(),
                                                       *self.policy.owners.values())):
            return np.zeros(0, np.int64)
        out = []
        for si, sh in enumerate(self.store.shards):
            codes, pairs = sh.document_labels()
            denied = np.array([not self.policy.rule(owner, license).allow for owner, license in pairs], dtype=bool)
            if len(codes) and denied.any():
                out.append((si << 32) | np.flatnonzero(denied[codes]).astype(np.int64))
        return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def allowed(self, shard: int, doc: int) -> bool:
        """May this document be surfaced in generation (allow: true)?"""
        return not np.isin(doc_key(shard, doc), self._denied)

    def cap(self, key: int) -> int | None:
        if key not in self._caps:
            rule = self.policy.rule_of(self._doc(key))
            if key >> 32 == TRAINING and not rule.allow:
                self._caps[key] = min(rule.cap or MIN_CAP, MIN_CAP)
            else:
                self._caps[key] = rule.cap
        return self._caps[key]

    # ------------------------------------------------------------------------------ per step
    def exclude(self) -> np.ndarray:
        """Document keys whose neighbours the mixture must drop this step: documents that may not be
        surfaced, and documents whose next token could take a verbatim span past their cap."""
        plan = self._planned()
        if not plan:
            return self._denied
        return np.concatenate([self._denied, np.fromiter(plan, dtype=np.int64, count=len(plan))])

    def adjust(self, p: torch.Tensor) -> torch.Tensor:
        """The next-token distribution with the tokens that would break a cap removed (renormalised)."""
        plan = self._planned()
        if not plan:
            return p
        blocked = torch.from_numpy(np.unique(np.concatenate(list(plan.values()))))
        for key, ids in plan.items():
            d = self._doc(key)
            self.events.append(GuardEvent(offset=len(self.text), document_id=d.id, owner=d.owner,
                                          shard=self._shard_name(key), span=self._follow[key].length,
                                          cap=int(self.cap(key)), blocked_tokens=int(len(ids)),
                                          blocked_mass=float(p[torch.from_numpy(ids)].sum())))
        out = p.clone()
        out[blocked] = 0
        total = float(out.sum())
        if total <= 0:  # everything the mixture wanted is blocked: any other token, uniformly
            out = torch.ones_like(p)
            out[blocked] = 0
            total = float(out.sum())
        return out / total

    def observe(self, text: str, documents=(), token: int | None = None) -> None:
        """After a token: `text` is the completion so far, `documents` the keys of the documents that
        carried the step (its neighbours' or RIC blocks' documents), `token` the token itself (for the
        training-data index)."""
        self._plan = None
        if self.training is not None and token is not None:
            documents = [*documents, *self._training_documents(token)]
        if text.startswith(self.text):
            start = len(self.text)
            self.text = text
            for m in self._follow.values():
                m.feed(text, start)
        else:  # decoding changed earlier characters (rare): measure the followed documents again
            self.text = text
            self._follow = {k: SuffixMatch.start(m.doc, text) for k, m in self._follow.items()}
        seen = set()
        for key in documents:
            key = int(key)
            seen.add(key)
            if key not in self._follow and self.cap(key) is not None and self.allowed(key >> 32, key & 0xFFFFFFFF):
                self._follow[key] = SuffixMatch.start(self._doc(key).text, text)
        for key in list(self._follow):
            m = self._follow[key]
            self.longest[key] = max(self.longest.get(key, 0), m.best)
            if m.length < self.FOLLOW_MIN and key not in seen:
                del self._follow[key]

    def _training_documents(self, token: int) -> list[int]:
        """Keys of the training documents the completion's last tokens occur in, once the run is long and
        rare enough to name few documents (see the module docstring)."""
        self._ids.append(int(token))
        idx = self.training.tokens
        self._run = idx.longest_suffix(self._ids[len(self._ids) - min(self._run + 1, len(self._ids)):])
        if self._run < TRAINING_FOLLOW_TOKENS:
            return []
        run = self._ids[len(self._ids) - self._run:]
        if idx.count(run) > TRAINING_FOLLOW_MAX:
            return []
        docs = np.unique(idx.occurrences(run, limit=TRAINING_FOLLOW_MAX).doc)
        return [(TRAINING << 32) | int(d) for d in docs]

    # ------------------------------------------------------------------------------ the plan
    def _planned(self) -> dict[int, np.ndarray]:
        if self._plan is None:
            self._plan = {}
            for key, m in self._follow.items():
                ids = self.blocked(m, int(self.cap(key)))
                if len(ids):
                    self._plan[key] = ids
        return self._plan

    def blocked(self, m: SuffixMatch, cap: int) -> np.ndarray:
        """Tokens whose text would make a verbatim span of `m`'s document longer than `cap` (see the
        module docstring)."""
        text, doc, L = self.text, m.doc, m.length
        floor = max(4, cap // 4)
        window = cap - floor  # tokens up to this long are found through the document's occurrences
        out = []
        short = self.tokens.lengths[self.tokens.lengths <= window]
        longest_short = int(short.max()) if len(short) else 0
        anchor_len = cap + 1 - longest_short  # >= floor + 1: every span over the cap ends in this anchor
        if longest_short and L >= anchor_len:
            anchor = text[len(text) - anchor_len:]
            pos = doc.find(anchor)
            while pos >= 0:
                end = pos + anchor_len
                a = anchor_len  # how far back the overlap at this occurrence reaches (at most L)
                while a < L and end - a - 1 >= 0 and text[-a - 1] == doc[end - a - 1]:
                    a += 1
                # characters of the document's continuation a token must repeat to pass the cap (at least
                # one: a span already over the cap, from a document followed late, must not grow)
                need = max(1, cap + 1 - a)
                if need <= longest_short and end + need <= len(doc):
                    ids = self.tokens.starting_with(doc[end:end + need])
                    out.append(ids[self.tokens.lengths[ids] <= window])
                pos = doc.find(anchor, pos + 1)
        for t in self.tokens.longer_than(window):  # the few long tokens: one by one
            s = self.tokens.texts[t]
            # a span over the cap through the end of the text holds at least s[:cap + 1 - L]; one inside s
            # alone needs len(s) > cap: rule both out with one search each before measuring exactly
            through = L + len(s) > cap and s[:max(1, cap + 1 - L)] in doc
            inside = len(s) > cap and any(s[i:i + cap + 1] in doc for i in range(len(s) - cap))
            if (through or inside) and SuffixMatch(doc, L).feed(text + s, len(text)) > cap:
                out.append(np.array([t], dtype=np.int64))
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)
