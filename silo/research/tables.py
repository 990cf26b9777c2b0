"""Tables of the research report: one set of rows, written as markdown, JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from silo.workflows.evaluate import EvalResult

from .modes import INFGRAM_MODES


def write_table(out_dir: Path, name: str, rows: list[dict], title: str = "", floatfmt: str = "{:.2f}") -> str:
    """rows (flat dicts) -> NAME.csv, NAME.json, NAME.md; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    (out_dir / f"{name}.json").write_text(json.dumps(rows, indent=1))
    with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else floatfmt.format(v)
        return str(v)

    md = (f"### {title}\n\n" if title else "") + "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    md += "".join("| " + " | ".join(cell(r.get(k)) for k in cols) + " |\n" for r in rows)
    (out_dir / f"{name}.md").write_text(md)
    return md


def _pct(x):
    return None if x is None else f"{100 * x:.0f}%"


def main_rows(res: EvalResult, variants: dict | None = None, infgram: dict | None = None) -> list[dict]:
    """One row per domain: every method's test perplexity and each method's share of the gap closed
    (`infgram`: `modes.infgram_rows`, the served inf-gram modes' perplexity per domain)."""
    return [_main_row(d, variants, ((infgram or {}).get("domains") or {}).get(d.domain, {})) for d in res.domains]


def _infgram_cells(d, inf: dict) -> tuple[list[tuple], list[tuple]]:
    """The inf-gram modes' cells of a domain's row and their gap closed (same parametric and reference)."""
    cells = [(col, inf[mode]) for mode, col in INFGRAM_MODES.items() if mode in inf]
    gap = (d.parametric - d.reference) if d.reference is not None and d.parametric is not None else 0
    gaps = [(f"gap closed {col}", (d.parametric - v) / gap if gap > 0 else None) for col, v in cells]
    return cells, gaps


def _main_row(d, variants: dict | None, inf: dict | None = None) -> dict:
    r = {"domain": d.domain, "tokens": d.tokens, "parametric": d.parametric}
    inf_cells, inf_gaps = _infgram_cells(d, inf or {})
    cells = [("kNN-LM", d.knn), ("kNN-LM gated", d.knn_gated)] + inf_cells
    cells += [(f"RIC-LM ({name})", v) for name, v in d.ric.items()]
    cells += [("parametric (RIC windows)", d.ric_parametric)]
    cells += [(f"{vname} (parametric)", v["domains"].get(d.domain))
              for vname, v in ((variants or {}).get("variants") or {}).items()]
    cells += [("reference", d.reference)]
    r.update({name: v for name, v in cells if v is not None or name.endswith("(parametric)")})
    gaps = [("gap closed kNN-LM", d.gap_closed), ("gap closed kNN-LM gated", d.gap_closed_gated)]
    gaps += inf_gaps + [(f"gap closed RIC-LM ({name})", g) for name, g in d.ric_gap_closed.items()]
    r.update({name: _pct(g) for name, g in gaps if g is not None})
    if d.knn_settings:
        s = d.knn_settings
        r["kNN k/λ/τ"] = f"{s['k']}/{s['lmbda']:.2f}/{s['tau']:.3g}"
    if d.reason:  # a domain without numbers keeps its row, with why
        r["note"] = d.reason
    return r
