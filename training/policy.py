"""Training policy: refuse (or drop) documents outside the allowed licence tiers, then de-duplicate.

The tiers come from the one licence table in `silo.core.licenses`; a missing or unrecognised licence is
`unknown`, never permissive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from silo.core.corpus import Document
from silo.core.licenses import DEFAULT_ALLOWED_TIERS, check_tiers


class PolicyViolation(ValueError):
    """Documents outside the licence policy were about to reach the weights."""

    def __init__(self, refused: list[Document], allowed_tiers: tuple[str, ...]):
        self.refused = refused
        self.allowed_tiers = allowed_tiers
        shown = "\n".join(
            f"  {d.id} (owner {d.owner}, licence {d.license or 'missing'} -> tier {d.tier})" for d in refused[:25]
        )
        more = f"\n  ... and {len(refused) - 25} more" if len(refused) > 25 else ""
        super().__init__(
            f"{len(refused)} document(s) are outside the training policy (allowed tiers: "
            f"{', '.join(allowed_tiers)}):\n{shown}{more}\n"
            "Remove them from the training corpus, put them in the datastore instead, or pass "
            "--drop-disallowed (train.drop_disallowed: true) to drop them and report the counts."
        )



@dataclass
class PolicyReport:
    allowed_tiers: tuple[str, ...]
    kept: list[Document]
    refused: list[Document]
    duplicates: list[tuple[str, str]]  # (dropped id, id of the kept copy)

    def summary(self) -> dict:
        by_tier: dict[str, int] = {}
        for d in self.kept:
            by_tier[d.tier] = by_tier.get(d.tier, 0) + 1
        return {
            "allowed_tiers": list(self.allowed_tiers),
            "kept_documents": len(self.kept),
            "kept_by_tier": by_tier,
            "refused_documents": len(self.refused),
            "exact_duplicates_removed": len(self.duplicates),
        }


def normalise_for_dedup(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n"))


def apply_policy(
    docs: list[Document],
    allowed_tiers: tuple[str, ...] | list[str] = DEFAULT_ALLOWED_TIERS,
    drop_disallowed: bool = False,
) -> PolicyReport:
    """Refuse (or drop) documents outside the allowed tiers, then remove exact duplicates.

    Raises PolicyViolation naming every refused document unless `drop_disallowed`.
    """
    allowed = check_tiers(tuple(allowed_tiers))
    refused = [d for d in docs if d.tier not in allowed]
    if refused and not drop_disallowed:
        raise PolicyViolation(refused, allowed)
    kept: list[Document] = []
    first_by_hash: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    for d in docs:
        if d.tier not in allowed:
            continue
        h = hashlib.sha256(normalise_for_dedup(d.text).encode("utf-8")).hexdigest()
        if h in first_by_hash:
            duplicates.append((d.id, first_by_hash[h]))
            continue
        first_by_hash[h] = d.id
        kept.append(d)
    return PolicyReport(allowed, kept, refused, duplicates)
