"""Readers for the SWORD modules: the World English Bible and Matthew Henry's commentary."""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

from .common import Doc, make_doc



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
