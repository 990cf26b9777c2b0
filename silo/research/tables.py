"""Tables of the research report: one set of rows, written as markdown, JSON and CSV."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from silo.workflows.evaluate import EvalResult


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


def main_rows(res: EvalResult, variants: dict | None = None) -> list[dict]:
    """One row per domain: every method's test perplexity and each method's share of the gap closed."""
    return [_main_row(d, variants) for d in res.domains]


def _main_row(d, variants: dict | None) -> dict:
    r = {"domain": d.domain, "tokens": d.tokens, "parametric": d.parametric}
    cells = [("kNN-LM", d.knn), ("kNN-LM gated", d.knn_gated)]
    cells += [(f"RIC-LM ({name})", v) for name, v in d.ric.items()]
    cells += [("parametric (RIC windows)", d.ric_parametric)]
    cells += [(f"{vname} (parametric)", v["domains"].get(d.domain))
              for vname, v in ((variants or {}).get("variants") or {}).items()]
    cells += [("reference", d.reference)]
    r.update({name: v for name, v in cells if v is not None or name.endswith("(parametric)")})
    gaps = [("gap closed kNN-LM", d.gap_closed), ("gap closed kNN-LM gated", d.gap_closed_gated)]
    gaps += [(f"gap closed RIC-LM ({name})", g) for name, g in d.ric_gap_closed.items()]
    r.update({name: _pct(g) for name, g in gaps if g is not None})
    if d.knn_settings:
        s = d.knn_settings
        r["kNN k/λ/τ"] = f"{s['k']}/{s['lmbda']:.2f}/{s['tau']:.3g}"
    if d.reason:  # a domain without numbers keeps its row, with why
        r["note"] = d.reason
    return r
