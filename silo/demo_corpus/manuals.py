"""A second, small corpus for a second datastore: software manuals, a kind of text the demo corpus lacks.

The demo's store holds plays and a dictionary; a user's store holds something else. This corpus is what
the test suite builds a second store from (and the gate is judged on): two owners, each a manual,

* `sgt-puzzles`: the manual of Simon Tatham's Portable Puzzle Collection (Debian `sgt-puzzles`,
  usr/share/doc/sgt-puzzles/puzzles.txt.gz; Expat/MIT), one document per chapter (the rules and
  controls of one puzzle), the licence appendix left out;
* `sqlite`: the SQLite documentation (Debian `sqlite3-doc`, usr/share/doc/sqlite3/*.html; public domain),
  one document per prose page, the indexes, cross-references, change logs and generated API/requirement
  lists left out,

split per owner into `datastore`, `val` and `test` (documents disjoint, chosen by a seeded shuffle), and
written as gzip JSONL with a MANIFEST.json (sources, versions, checksums, the licence evidence quoted from
each package's copyright file). Built once with `silo corpus build-manuals` and shipped in
silo/data/manuals/; nothing downloads at test time.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import random
import re
import sys
from pathlib import Path
from typing import Iterable

from .build import _atomic_write, encode_split, split_summary
from .common import Doc, PD, normalize_text
from .sources import SourceCache, debian_copyright

SEED = "silo-manuals-corpus-v1"
PACKAGES = {"sgt-puzzles": "sgt-puzzles", "sqlite": "sqlite3-doc"}
LICENSES = {"sgt-puzzles": ("MIT", r"License: Expat\s*\n\s*Permission is hereby granted, free of charge"),
            "sqlite": (PD, r"License: public-domain\s+The files listed have been put on the public domain")}
DOMAINS = {"sgt-puzzles": "puzzles", "sqlite": "sqlite"}
# documents per held-out split, and characters of the datastore split, per owner
HELD_OUT_DOCS = {"sgt-puzzles": 4, "sqlite": 4}
DATASTORE_CHARS = {"sgt-puzzles": 110_000, "sqlite": 160_000}
SQLITE_SKIP = re.compile(r"^(releaselog|c3ref|session|doc_|changes|capi3ref|requirements|syntaxdiagrams|"
                         r"keyword_index|doclist|sitemap|news|chronology|index|docs|opcode|lang\.html|copyright-)")
SPLITS = ("datastore", "val", "test")


def puzzle_docs(root: Path) -> list[Doc]:
    """One document per chapter of the puzzles manual (appendices left out)."""
    path = root / "usr/share/doc/sgt-puzzles/puzzles.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    text = text.split("\nAppendix A:")[0]
    parts = re.split(r"\n(?=Chapter \d+: )", text)
    docs = []
    for part in parts[1:]:
        title = part.split("\n", 1)[0].strip()
        body = "\n".join(line[7:] if line.startswith("       ") else line.strip() for line in part.split("\n"))
        n = int(title.split()[1].rstrip(":"))
        docs.append(_doc(f"sgt-puzzles/chapter-{n:02d}", body, "sgt-puzzles", title,
                         f"debian:sgt-puzzles:{path.relative_to(root).as_posix()}"))
    return docs


class _Text(html.parser.HTMLParser):
    BLOCK = {"p", "br", "div", "h1", "h2", "h3", "h4", "li", "tr", "pre", "blockquote", "table", "dt", "dd"}

    def __init__(self):
        super().__init__()
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")
        if tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style")
        if tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_text(page: str) -> tuple[str, str]:
    """(title, prose) of an SQLite documentation page: the text after the site's menu, paragraphs reflowed."""
    p = _Text()
    p.feed(page)
    text = "".join(p.out)
    title = re.search(r"<title>(.*?)</title>", page, re.S)
    text = text.split("Search Changelog", 1)[-1]
    paras = [" ".join(x.split()) for x in re.split(r"\n\s*\n", text)]
    paras = [x for x in paras if x and x not in ("►", "Table Of Contents")]
    return (" ".join(title.group(1).split()) if title else ""), "\n\n".join(paras)


def sqlite_docs(root: Path) -> list[Doc]:
    """One document per prose page of the SQLite documentation (2,000 to 40,000 characters)."""
    base = root / "usr/share/doc/sqlite3"
    docs = []
    for path in sorted(base.glob("*.html")):
        if SQLITE_SKIP.match(path.name):
            continue
        title, text = html_text(path.read_text(encoding="utf-8", errors="replace"))
        if 2_000 <= len(text) <= 40_000:
            docs.append(_doc(f"sqlite/{path.stem}", text, "sqlite", title or path.stem,
                             f"debian:sqlite3-doc:{path.relative_to(root).as_posix()}"))
    return docs


def _doc(id: str, text: str, owner: str, title: str, source: str) -> Doc:
    return {"id": id, "text": normalize_text(text), "owner": owner, "source": source, "license": LICENSES[owner][0],
            "title": title, "domain": DOMAINS[owner], "split": ""}


def split_owner(owner: str, docs: list[Doc]) -> dict[str, list[Doc]]:
    """val and test: HELD_OUT_DOCS[owner] documents each; datastore: the rest up to DATASTORE_CHARS[owner]."""
    order = sorted(docs, key=lambda d: d["id"])
    random.Random(f"{SEED}:{owner}").shuffle(order)
    n = HELD_OUT_DOCS[owner]
    out = {"val": order[:n], "test": order[n:2 * n], "datastore": []}
    total = 0
    for d in order[2 * n:]:
        if total + len(d["text"]) <= DATASTORE_CHARS[owner]:
            out["datastore"].append(d)
            total += len(d["text"])
    return out


def build_manuals_corpus(out_dir: Path, cache_dir: Path) -> dict:
    """Fetch the two packages, check their licence statements, write the three splits + MANIFEST.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = SourceCache(cache_dir)
    splits: dict[str, list[Doc]] = {s: [] for s in SPLITS}
    licences = {}
    for owner, read in (("sgt-puzzles", puzzle_docs), ("sqlite", sqlite_docs)):
        root = cache.deb(PACKAGES[owner])
        statement, where = debian_copyright(root, PACKAGES[owner])
        spdx, pattern = LICENSES[owner]
        found = re.search(pattern, statement, re.S)
        if not found:
            raise RuntimeError(f"{where}: no licence statement matching {pattern!r}; refusing to ship {owner}")
        licences[owner] = {"source": f"debian:{PACKAGES[owner]}", "spdx": spdx, "file": where,
                           "evidence": " ".join(found.group(0).split())}
        for split, docs in split_owner(owner, read(root)).items():
            for d in docs:
                d["split"] = split
            splits[split] += docs
    manifest = {"name": "silo-manuals-corpus", "builder": "silo/demo_corpus/manuals.py", "seed": SEED,
                "sources": dict(sorted(cache.used.items())), "licenses": licences, "splits": {}}
    for split in SPLITS:
        docs = sorted(splits[split], key=lambda d: d["id"])
        blob = encode_split(docs)
        _atomic_write(out_dir / f"{split}.jsonl.gz", blob)
        manifest["splits"][split] = split_summary(docs, blob, f"{split}.jsonl.gz")
    _atomic_write(out_dir / "MANIFEST.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
    return manifest


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild SILO's second corpus (software manuals).")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "manuals")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/silo/corpus-src").expanduser())
    args = parser.parse_args(list(argv) if argv is not None else None)
    manifest = build_manuals_corpus(args.out, args.cache)
    for split, s in manifest["splits"].items():
        print(f"{split:9s} {s['documents']:4d} docs {s['characters'] / 1e3:6.0f}K chars "
              f"{s['compressed_bytes'] / 1e3:5.0f}KB gz  {dict((k, v['documents']) for k, v in s['domains'].items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
