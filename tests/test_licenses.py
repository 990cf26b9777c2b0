"""Licence expressions: every licence of the shipped corpus and the SPDX operators AND / OR / WITH."""

from __future__ import annotations

import pytest

from silo.core.corpus import DEMO_SPLITS, load_documents
from silo.core.licenses import TIERS, tier_of

# what each licence of the shipped demo corpus must be (README, "Demo corpus")
SHIPPED = {"LicenseRef-PublicDomain": "pd", "PSF-2.0": "sw", "CC-BY-2.5": "by", "GPL-2.0-or-later": "copyleft"}


def test_every_licence_of_the_shipped_corpus():
    seen = {}
    for split in DEMO_SPLITS:
        for d in load_documents(f"pkg:demo/{split}"):
            seen.setdefault(d.license, set()).add(d.tier)
    assert set(seen) == set(SHIPPED), f"the shipped corpus has licences {sorted(seen)}; update SHIPPED"
    for lic, tiers in seen.items():
        assert tiers == {SHIPPED[lic]}, (lic, tiers)


@pytest.mark.parametrize("expression,tier", [
    ("MIT OR Apache-2.0", "sw"),
    ("GPL-2.0-or-later WITH Classpath-exception-2.0", "copyleft"),  # an exception keeps the base tier
    ("MIT AND CC-BY-NC-4.0", "nc"),                                  # AND: the most restrictive part
    ("CC-BY-NC-4.0 OR MIT", "sw"),                                   # OR: the least restrictive part
    ("CC-BY-2.5 OR GPL-2.0-or-later", "by"),
    ("LicenseRef-PublicDomain AND PSF-2.0", "sw"),
    ("(MIT AND (GPL-2.0-only OR BSD-3-Clause))", "sw"),
    ("MIT AND (GPL-2.0-only OR CC-BY-NC-4.0)", "copyleft"),
    ("LicenseRef-Proprietary AND MIT", "proprietary"),
    ("LicenseRef-PublicDomain", "pd"),
    ("LicenseRef-Anything-Else", "unknown"),                          # LicenseRef-* not in the table
    ("MIT AND LicenseRef-Anything-Else", "unknown"),                   # one unknown part binds under AND
    ("LicenseRef-Anything-Else OR MIT", "sw"),                         # ... but MIT may be chosen under OR
    ("mit or apache-2.0", "sw"),                                      # ids and operators in any case
    ("GPL-2.0", "copyleft"),                                          # a deprecated id: its normalised key
    ("MIT AND", "unknown"),                                           # malformed
    ("((MIT", "unknown"),
    ("public domain", "unknown"),                                     # not an SPDX id
    ("Some-Custom-License", "unknown"),
    ("", "unknown"),
    (None, "unknown"),
])
def test_expressions(expression, tier):
    assert tier_of(expression) == tier
    assert tier in TIERS


def test_policy_check_reads_expressions(tmp_path, capsys):
    """`silo corpus check` (training's policy) refuses an AND with a non-commercial part and keeps an OR
    that offers a permissive choice."""
    from conftest import write_docs

    path = write_docs(tmp_path / "c.jsonl", [
        {"id": "ok", "text": "one", "owner": "o", "license": "MIT OR CC-BY-NC-4.0"},
        {"id": "bad", "text": "two", "owner": "o", "license": "MIT AND CC-BY-NC-4.0"},
    ])
    from silo.cli import main

    assert main(["corpus", "check", str(path), "--policy", "pdsw"]) == 1
    err = capsys.readouterr().err
    assert "bad (owner o, licence MIT AND CC-BY-NC-4.0 -> tier nc)" in err
    assert "ok (" not in err
