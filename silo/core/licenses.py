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
"""

from __future__ import annotations

TIERS = ("pd", "sw", "by", "copyleft", "nc", "unknown", "proprietary")

# Keys are lower-cased SPDX ids (or LicenseRef-* for things SPDX has no id for).
LICENSE_TIERS: dict[str, str] = {
    # public domain
    "licenseref-publicdomain": "pd",
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
    """Tier of a licence id; a missing or unrecognised id is `unknown`, never permissive."""
    if not license_id or not str(license_id).strip():
        return "unknown"
    return LICENSE_TIERS.get(str(license_id).strip().lower(), "unknown")


def check_tiers(tiers: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise ValueError(f"unknown licence tier(s) {bad}; tiers are {', '.join(TIERS)}")
    return tuple(tiers)
