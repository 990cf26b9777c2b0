"""The inf-gram rows of the research report and what each nonparametric mode costs on disk.

* `infgram_rows` -- per test domain, the perplexity of modes `infgram` and `knn+infgram` through the store's
  served inf-gram gates (the retrievers `silo generate` and the server use), on the same decontaminated test
  positions as the evaluation's other rows; where the store does not offer a mode, one line says why.
* `mode_bytes` -- the bytes each mode reads from the store's shard folders, summed from the files on disk:
  kNN-LM index.faiss + entries.npy + keys.npy, RIC-LM per retriever the block text (blocks.jsonl) and that
  retriever's index (bm25/ or dense.faiss), inf-gram tokens.bin + table.idx + rows.npy + starts.npy, and
  kNN-LM + inf-gram both. Divided by the stored tokens (the rows of every shard's entries.npy) it is the
  x axis of the bytes plot; a mode whose files are absent is left out with the reason.
* `bytes_rows` -- those bytes beside the mean test perplexity over the store's own domains (the domains of
  the documents in the store, where the test split has them): the figure a researcher weighs when choosing
  a mode.
"""

from __future__ import annotations

import math
from pathlib import Path

from silo.datastore.store import Datastore
from silo.model.lm import SiloLM
from silo.workflows.evaluate import EvalConfig, cached_collect, held_out_text
from silo.workflows.tuning import ppl

INFGRAM_MODES = {"infgram": "inf-gram", "knn+infgram": "kNN-LM + inf-gram"}  # mode -> column of the results
KNN_FILES = ("index.faiss", "entries.npy", "keys.npy")
INFGRAM_FILES = ("tokens.bin", "table.idx", "rows.npy", "starts.npy")
RIC_TEXT = "blocks.jsonl"
RIC_INDEX = {"bm25": "bm25", "dense": "dense.faiss"}  # retriever -> its file or folder under blocks/


# ------------------------------------------------------------------------------------------ inf-gram rows

def infgram_absent(lm: SiloLM) -> dict[str, str]:
    """{mode: why the attached store does not offer it} for the inf-gram modes it lacks."""
    path = lm.store.path
    fit = f"`silo datastore fit-infgram --config <the gate section> --store {path}`"
    out = {}
    for mode in INFGRAM_MODES:
        if mode in lm.modes():
            continue
        ngrams, problem, _ = lm.ngrams()
        if ngrams is None and "no inf-gram index" in problem:  # StoreNgrams: a shard without one
            out[mode] = (f"no inf-gram indexes ({problem.split(';')[0]}): run `silo datastore build-infgram "
                         f"--store {path}`, then {fit}")
        elif ngrams is None:
            out[mode] = f"the store's inf-gram indexes cannot be used: {problem}"
        else:
            base = "kNN-LM" if mode == "knn+infgram" else "LM"
            out[mode] = f"no inf-gram gate over the {base} in {path}/infgram.json: run {fit}"
    return out


def infgram_rows(ev: EvalConfig, lm: SiloLM, cache: dict | None = None) -> dict:
    """Per test domain the served inf-gram modes' perplexity and mean lambda; `absent` says why a mode has
    no rows, `gates` describes the gates served."""
    absent = infgram_absent(lm)
    offered = [m for m in INFGRAM_MODES if m not in absent]
    out = {"domains": {}, "absent": absent, "gates": {}}
    if not offered:
        return out
    _, _, gates = lm.ngrams()
    out["gates"] = {m: gates["knn" if m == "knn+infgram" else "lm"].describe() for m in offered}
    retrievers = {m: lm.retriever(m) for m in offered}
    held = held_out_text(ev, lm, progress=False)  # the evaluation's test text, near-copies left out as there
    for dom, texts in held.test.items():
        pos = cached_collect(lm, texts, ev.max_tokens, cache, ("test", dom))
        ids = [lm.text_ids(t) for t in texts]  # what cached_collect read: the positions are their first ones
        row = {"tokens": int(len(pos.targets))}
        for mode, retr in retrievers.items():
            logp, lam, _ = retr.mix_positions(pos, ids)
            row[mode] = ppl(logp)
            row[f"{mode} mean λ"] = float(lam.mean()) if len(lam) else 0.0
        out["domains"][dom] = row
    return out


# ------------------------------------------------------------------------------------------ bytes on disk

def _files(folder: Path) -> list[Path]:
    return [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())


def mode_files(store: Datastore) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """({mode: the files it reads in the store's shards}, {mode: why it has none}); a mode counts only when
    every shard holds its files (a search over part of the store is not the mode)."""
    shards = [s.dir for s in store.shards]
    wanted: dict[str, list[Path]] = {"kNN-LM": [d / f for d in shards for f in KNN_FILES]}
    for r, name in RIC_INDEX.items():
        wanted[f"RIC-LM ({r})"] = [p for d in shards for p in (d / "blocks" / RIC_TEXT, d / "blocks" / name)]
    wanted["inf-gram"] = [d / "infgram" / f for d in shards for f in INFGRAM_FILES]
    files, absent = {}, {}
    for mode, paths in wanted.items():
        missing = [p for p in paths if not p.exists()]
        if not paths or missing:
            absent[mode] = _absent_reason(mode, missing, store.path)
            continue
        files[mode] = [f for p in paths for f in _files(p)]
    if "kNN-LM" in files and "inf-gram" in files:
        files["kNN-LM + inf-gram"] = files["kNN-LM"] + files["inf-gram"]
    return files, absent


def _absent_reason(mode: str, missing: list[Path], store: Path) -> str:
    first = str(missing[0]) if missing else "no shards"
    how = {"kNN-LM": "a store without its kNN files",
           "inf-gram": f"no inf-gram indexes: run `silo datastore build-infgram --store {store}`"}
    if mode.startswith("RIC-LM"):
        return f"no {mode} blocks: run `silo datastore build-blocks --store {store}` ({first} missing)"
    return f"{how.get(mode, 'files missing')} ({first} missing, {len(missing)} file(s) in all)"


def stored_tokens(store: Datastore) -> int:
    """Tokens stored in the shards' files: the rows of every shard's entries.npy (tombstoned ones too, as
    the files still hold them)."""
    return int(sum(len(s.entries) for s in store.shards))


def mode_bytes(store: Datastore) -> tuple[dict[str, dict], dict[str, str]]:
    """({mode: {bytes, files, bytes_per_token}}, {mode: why it is left out}), from the sizes on disk."""
    files, absent = mode_files(store)
    tokens = stored_tokens(store)
    out = {}
    for mode, fs in files.items():
        size = sum(f.stat().st_size for f in fs)
        out[mode] = {"bytes": int(size), "files": len(fs), "stored_tokens": tokens,
                     "bytes_per_token": size / tokens if tokens else math.nan}
    return out, absent


def store_domains(store: Datastore) -> list[str]:
    return sorted({d.domain or "default" for s in store.shards for d in s.documents})


def bytes_rows(store: Datastore, results: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per mode: bytes on disk, bytes per stored token and the mean test perplexity over the store's
    domains (the served kNN-LM row, gated, where the results have it); and the lines saying what was left
    out and why."""
    sizes, absent = mode_bytes(store)
    doms = set(store_domains(store))
    rows_of = [r for r in results if r["domain"] in doms]
    notes = [f"{m}: left out: {why}" for m, why in absent.items()]
    if not rows_of:
        notes.append(f"no test domain is one of the store's ({', '.join(sorted(doms))}): the mean is over every "
                     "test domain")
        rows_of = list(results)
    knn = "kNN-LM gated" if any(isinstance(r.get("kNN-LM gated"), float) for r in rows_of) else "kNN-LM"
    out = [{"mode": "parametric", "column": "parametric", "bytes": 0, "files": 0, "bytes per token": 0.0,
            "mean perplexity": _mean(rows_of, "parametric"), "domains": ", ".join(r["domain"] for r in rows_of)}]
    for mode, s in sizes.items():
        col = knn if mode == "kNN-LM" else mode
        row = {"mode": mode, "column": col, "bytes": s["bytes"], "files": s["files"],
               "bytes per token": s["bytes_per_token"], "mean perplexity": _mean(rows_of, col),
               "domains": ", ".join(r["domain"] for r in rows_of)}
        if row["mean perplexity"] is None:
            row["note"] = f"no '{col}' perplexity in every domain's row (files present, mode not evaluated)"
        out.append(row)
    return out, notes


def _mean(rows: list[dict], col: str) -> float | None:
    vals = [r.get(col) for r in rows]
    if not vals or not all(isinstance(v, float) and math.isfinite(v) for v in vals):
        return None
    return sum(vals) / len(vals)


__all__ = ["infgram_rows", "infgram_absent", "mode_files", "mode_bytes", "bytes_rows", "stored_tokens",
           "store_domains", "INFGRAM_MODES"]
