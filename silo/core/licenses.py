"""The one table that maps licence ids to risk tiers, and the training policy built on it.

Tiers (SILO's terms):
  pd           public domain
  sw           permissive software licences (MIT, BSD, Apache, PSF, ...)
  by           attribution licences (CC-BY family)
  copyleft     share-alike / GPL family
  nc           non-commercial
  unknown      missing or unrecognised licence: never treated as permissive
  proprietary  all rights reserved

A training policy names the tiers allowed into the weights: PD = {pd}, PDSW = {pd, sw} (the default),
PDSWBY = {pd, sw, by}. Everything else can only reach the model through the datastore.

A licence field may be an SPDX expression (parsed with the `license-expression` library):
`A AND B` binds the user to both, so it takes the most restrictive tier of its parts; `A OR B` lets the
user choose, so it takes the least restrictive; `A WITH exception` keeps A's tier; an id the table does
not know (or an expression that does not parse) is `unknown`. TIERS is ordered from least to most
restrictive.
"""

from __future__ import annotations

from functools import lru_cache

TIERS = ("pd", "sw", "by", "copyleft", "nc", "unknown", "proprietary")

# Keys are lower-cased SPDX ids (or LicenseRef-* for things SPDX has no id for).
LICENSE_TIERS: dict[str, str] = {
    # public domain
    "licenseref-publicdomain": "pd",
    "licenseref-scancode-public-domain": "pd",  # what license-expression normalises LicenseRef-PublicDomain to
    "cc0-1.0": "pd",
    "cc-pddc": "pd",
    "unlicense": "pd",
    # permissive software
    "mit": "sw",
    "mit-0": "sw",
    "bsd-2-clause": "sw",
    "bsd-3-clause": "sw",
    "apache-2.0": "sw",
    "psf-2.0": "sw",
    "python-2.0": "sw",
    "isc": "sw",
    "zlib": "sw",
    "bsl-1.0": "sw",
    # attribution
    "cc-by-2.0": "by",
    "cc-by-2.5": "by",
    "cc-by-3.0": "by",
    "cc-by-4.0": "by",
    # copyleft
    "gpl-2.0-only": "copyleft",
    "gpl-2.0-or-later": "copyleft",
    "gpl-3.0-only": "copyleft",
    "gpl-3.0-or-later": "copyleft",
    "lgpl-2.1-or-later": "copyleft",
    "lgpl-3.0-or-later": "copyleft",
    "agpl-3.0-only": "copyleft",
    "agpl-3.0-or-later": "copyleft",
    "mpl-2.0": "copyleft",
    "cc-by-sa-3.0": "copyleft",
    "cc-by-sa-4.0": "copyleft",
    "gfdl-1.3-or-later": "copyleft",
    # non-commercial
    "cc-by-nc-4.0": "nc",
    "cc-by-nc-sa-4.0": "nc",
    "cc-by-nc-nd-4.0": "nc",
    # explicit unknown / proprietary
    "licenseref-unknown": "unknown",
    "noassertion": "unknown",
    "licenseref-proprietary": "proprietary",
    "licenseref-allrightsreserved": "proprietary",
}

# Named policies of the SILO paper.
POLICIES: dict[str, tuple[str, ...]] = {
    "pd": ("pd",),
    "pdsw": ("pd", "sw"),
    "pdswby": ("pd", "sw", "by"),
}
DEFAULT_ALLOWED_TIERS: tuple[str, ...] = POLICIES["pdsw"]


def tier_of(license_id: str | None) -> str:
    """Tier of a licence id or SPDX expression; a missing or unrecognised licence is `unknown`, never
    permissive (see the module docstring for AND / OR / WITH)."""
    if not license_id or not str(license_id).strip():
        return "unknown"
    text = str(license_id).strip()
    plain = LICENSE_TIERS.get(text.lower())
    return plain if plain is not None else _expression_tier(text)


_RANK = {t: i for i, t in enumerate(TIERS)}


@lru_cache(maxsize=4096)
def _expression_tier(text: str) -> str:
    from license_expression import ExpressionError

    try:
        expr = _licensing().parse(text, validate=False)
    except (ExpressionError, ValueError, TypeError):  # malformed: "MIT AND", unbalanced brackets ...
        return "unknown"
    return _tier_of_node(expr) if expr is not None else "unknown"


@lru_cache(maxsize=1)
def _licensing():
    from license_expression import get_spdx_licensing

    return get_spdx_licensing()


def _tier_of_node(node) -> str:
    from license_expression import LicenseSymbol, LicenseWithExceptionSymbol

    if isinstance(node, LicenseWithExceptionSymbol):
        # An exception (Classpath, GCC runtime, LLVM ...) only adds permissions for linking or
        # distributing binaries; the text under it still carries the base licence's conditions, so the
        # base licence decides the tier (treating it as more permissive would be a guess).
        return _tier_of_node(node.license_symbol)
    if isinstance(node, LicenseSymbol):
        # license-expression normalises deprecated ids and known aliases to one key (GPL-2.0 ->
        # GPL-2.0-only); the table may list any of the names
        for name in (node.key, *getattr(node, "aliases", ())):
            tier = LICENSE_TIERS.get(str(name).lower())
            if tier is not None:
                return tier
        return "unknown"
    parts = [_tier_of_node(a) for a in getattr(node, "args", ())]
    if not parts:
        return "unknown"
    licensing = _licensing()
    if isinstance(node, licensing.AND):  # every licence applies at once: the most restrictive one binds
        return max(parts, key=_RANK.__getitem__)
    if isinstance(node, licensing.OR):  # the user may pick any one: the least restrictive one is available
        return min(parts, key=_RANK.__getitem__)
    return "unknown"


def check_tiers(tiers: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise ValueError(f"unknown licence tier(s) {bad}; tiers are {', '.join(TIERS)}")
    return tuple(tiers)
