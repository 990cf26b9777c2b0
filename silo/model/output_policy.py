"""Output controls: what a generation may surface from the datastore, per licence tier and per owner.

    output_policy:                         # YAML section (configs/demo.yaml)
      tiers:
        by: {max_verbatim_chars: 80, notice: required}
        copyleft: {notice: required}
      owners:
        some-owner: {allow: false}
      notice_min_share: 0.05

A document's rule is the strictest of three: `all` (every document), its licence tier's and its owner's
(the smallest cap; a notice if any of them requires one; allowed only if all of them allow it):

  max_verbatim_chars  the longest span of one document an output may repeat verbatim (None: no cap);
                      enforced during generation by `silo.model.guard.VerbatimGuard`
  notice              required | none; unset means the tier's default: required for by, copyleft and nc,
                      whose licences ask for attribution or the licence notice with the text
  allow               false: the document may still be retrieved to score text, but its neighbours are
                      dropped from the generation mixture (and RIC never prepends its blocks)

A request may only tighten the operator's policy (`restricted`): a cap for every document (the smaller
cap wins), owners and tiers to exclude, notices for every source. Nothing is capped by default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Literal

from pydantic import Field, PrivateAttr, field_validator

from silo.core.config import StageConfig
from silo.core.licenses import TIERS, tier_of
from silo.datastore.format import StoredDocument

from .types import Notice, SentenceAttribution

MIN_CAP = 8  # a cap shorter than a few words would forbid the commonest phrases of a language
NOTICE_TIERS = ("by", "copyleft", "nc")  # whose licences ask for a notice with the text, by default
# whose licences ask for their notice with a verbatim copy: a training document's span found in an output
# (MIT, BSD, Apache-2.0, PSF-2.0 want the copyright and licence notice to travel with substantial copies)
COPY_NOTICE_TIERS = ("sw",) + NOTICE_TIERS


class OutputRule(StageConfig):
    max_verbatim_chars: int | None = Field(None, ge=MIN_CAP)
    notice: Literal["required", "none"] | None = None  # None: the tier's default (see NOTICE_TIERS)
    allow: bool = True


@dataclass(frozen=True)
class Rule:
    """The rule that applies to one document (its tier's, its owner's and `all` combined)."""

    cap: int | None
    notice: bool
    allow: bool
    copy_notice: bool = False  # a verbatim span of the document (training data) needs its notice


def _min_cap(*caps: int | None) -> int | None:
    given = [c for c in caps if c is not None]
    return min(given) if given else None


class OutputPolicy(StageConfig):
    all: OutputRule = Field(default_factory=OutputRule)  # applies to every document
    tiers: dict[str, OutputRule] = Field(default_factory=dict)
    owners: dict[str, OutputRule] = Field(default_factory=dict)
    # a source whose share of some sentence reaches this gets its notice in the response (if required)
    notice_min_share: float = Field(0.05, ge=0.0, le=1.0)
    span_min_chars: int = Field(20, ge=4)  # shortest verbatim span reported as evidence in attributions
    # shortest span of an output found in the training data that is traced (attributions, notices)
    trace_min_chars: int = Field(32, ge=8)
    _rules: dict = PrivateAttr(default_factory=dict)

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, v: dict[str, OutputRule]) -> dict[str, OutputRule]:
        bad = [t for t in v if t not in TIERS]
        if bad:
            raise ValueError(f"unknown licence tier(s) {bad}; tiers are {', '.join(TIERS)}")
        return v

    def rule(self, owner: str, license: str | None) -> Rule:
        """The strictest of `all`, the licence's tier's and the owner's rules."""
        key = (owner, license or "")
        got = self._rules.get(key)
        if got is None:
            tier = tier_of(license)
            parts = [r for r in (self.all, self.tiers.get(tier), self.owners.get(owner)) if r is not None]
            notice_default = tier in NOTICE_TIERS and (self.tiers.get(tier) is None or self.tiers[tier].notice is None)
            said = [r.notice for r in parts if r.notice is not None]
            got = Rule(cap=_min_cap(*(r.max_verbatim_chars for r in parts)),
                       notice=notice_default or any(r.notice == "required" for r in parts),
                       allow=all(r.allow for r in parts),
                       copy_notice="required" in said or (tier in COPY_NOTICE_TIERS and "none" not in said))
            self._rules[key] = got
        return got

    def rule_of(self, doc: StoredDocument) -> Rule:
        """The rule of a store document (its owner and licence)."""
        return self.rule(doc.owner, doc.license)

    @property
    def guarded(self) -> bool:
        """Whether generation needs a guard: some rule caps verbatim spans or disallows documents."""
        rules = [self.all, *self.tiers.values(), *self.owners.values()]
        return any(r.max_verbatim_chars is not None or not r.allow for r in rules)

    def restricted(self, max_verbatim_chars: int | None = None, exclude_owners: Iterable[str] = (),
                   exclude_tiers: Iterable[str] = (), notices: bool = False) -> "OutputPolicy":
        """This policy tightened by a request (never loosened: rules only ever combine to the strictest).
        The request's values were validated where they were made (silo.model.request.OutputControls)."""
        exclude_tiers, exclude_owners = list(exclude_tiers), list(exclude_owners)
        if max_verbatim_chars is None and not exclude_tiers and not exclude_owners and not notices:
            return self
        data = self.model_dump()
        a = data["all"]
        a["max_verbatim_chars"] = _min_cap(a["max_verbatim_chars"], max_verbatim_chars)
        if notices:
            a["notice"] = "required"
        for group, names in (("owners", exclude_owners), ("tiers", exclude_tiers)):
            for name in names:
                data[group].setdefault(name, {})["allow"] = False
        return OutputPolicy.model_validate(data)


NO_POLICY = OutputPolicy()


def disclosed(attributions: Iterable[SentenceAttribution], policy: OutputPolicy, role: str,
              owner: str | None = None) -> list[SentenceAttribution]:
    """The attributions as a caller may see them. A source's supporting sentence is the store's own text,
    so it obeys the completion's own limit: cut to the document's `max_verbatim_chars`, unless the caller is
    the admin or the source's own owner (the roles of the owners' Lookup). `role`: admin | owner | public."""
    if role == "admin":
        return list(attributions)
    out = []
    for a in attributions:
        sources = []
        for s in a.sources:
            cap = policy.rule(s.owner, s.license).cap
            if cap is not None and len(s.sentence) > cap and not (role == "owner" and s.owner == owner):
                s = replace(s, sentence=s.sentence[:cap])
            sources.append(s)
        out.append(replace(a, sources=sources))
    return out


def license_notices(attributions: Iterable[SentenceAttribution], policy: OutputPolicy) -> list[Notice]:
    """The notices a response must carry: one per source document whose rule requires a notice and whose
    share of some sentence reaches `policy.notice_min_share`, and one per training document a sentence
    repeats verbatim whose licence asks for its notice with a copy (`Rule.copy_notice`; share: the
    characters of the sentence the span covers), largest share first."""
    attributions = list(attributions)
    found: dict[tuple[str, str], Notice] = {}
    for a in attributions:
        for sp in a.training:
            if not policy.rule(sp.owner, sp.license).copy_notice:
                continue
            key, share = ("training", sp.document_id), (sp.end - sp.start) / max(1, a.end - a.start)
            if key in found:
                found[key].share = max(found[key].share, share)
            else:
                found[key] = Notice(document_id=sp.document_id, title=sp.title, owner=sp.owner, license=sp.license,
                                    source=sp.source, url=sp.url, share=share, origin="training")
    for a in attributions:
        for s in a.sources:
            if s.share < policy.notice_min_share or not policy.rule(s.owner, s.license).notice:
                continue
            key = (s.shard, s.document_id)
            if key in found:
                found[key].share = max(found[key].share, s.share)
            else:
                found[key] = Notice(document_id=s.document_id, title=s.title, owner=s.owner, license=s.license,
                                    source=s.source, url=s.url, share=s.share)
    return sorted(found.values(), key=lambda n: -n.share)
