"""PNG plots of the research report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_domains(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k for k in rows[0] if k not in ("domain", "tokens", "kNN k/λ/τ") and not k.startswith("gap closed")]
    methods = [m for m in methods if any(isinstance(r.get(m), (int, float)) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) * max(1, len(methods)) / 3), 4.2))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(rows))
    for i, m in enumerate(methods):
        vals = [r.get(m) if isinstance(r.get(m), (int, float)) else np.nan for r in rows]
        bars = ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, [r["domain"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title("Perplexity per domain and method")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(sc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(sc["rows"][0]["domains"]) if sc["rows"] else []
    fig, axes = plt.subplots(1, max(1, len(doms)), figsize=(3.6 * max(1, len(doms)), 3.4), squeeze=False)
    xs = [r["entries_share"] for r in sc["rows"]]
    for ax, dom in zip(axes[0], doms):
        per = [r["domains"].get(dom, {}) for r in sc["rows"]]
        ax.plot(xs, [p.get("knn") for p in per], "o-", label="kNN-LM")
        for key in sorted({k for p in per for k in p if k.startswith("ric_")}):
            ax.plot(xs, [p.get(key) for p in per], "s--", label=f"RIC-LM ({key[4:]})")
        ax.axhline(per[-1]["parametric"], color="gray", ls=":", label="parametric")
        if per[-1].get("reference"):
            ax.axhline(per[-1]["reference"], color="black", ls="-.", label="reference")
        ax.set_xscale("log", base=2)
        ax.set_title(dom)
        ax.set_xlabel("share of datastore entries")
        ax.set_ylabel("test perplexity")
    if doms:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Datastore scaling")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lambda(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for dom, pts in curves.items():
        base = pts[0]["val_ppl"] if pts and pts[0]["lmbda"] == 0 else 1.0
        ax.plot([p["lmbda"] for p in pts], [p["val_ppl"] / base for p in pts], "o-", label=dom)
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xlabel("λ (weight of the kNN distribution)")
    ax.set_ylabel("validation perplexity / parametric")
    ax.set_title("kNN-LM λ sensitivity (best k, τ per λ)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gate(points: dict[str, tuple[np.ndarray, np.ndarray]], tau_ref: float, path: Path) -> None:
    """lambda against the nearest neighbour's distance (relative to the store's scale), one colour per domain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.0))
    for dom, (d1, lam) in points.items():
        ax.scatter(d1 / tau_ref, lam, s=3, alpha=0.35, label=dom)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("nearest neighbour's squared distance / store distance scale (log)")
    ax.set_ylabel("λ (weight of the datastore)")
    ax.set_title("The gate: λ per test token")
    ax.legend(fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_skip(curve: list[dict], path: Path) -> None:
    """Validation perplexity (relative to searching everywhere) against the share of searches skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    xs = [c["skipped"] for c in curve]
    ys = [c["relative"] for c in curve]
    ax.plot(xs, ys, "o-")
    for c in curve:
        ax.annotate(f"{c['threshold']:g}", (c["skipped"], c["relative"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xlabel("share of searches skipped")
    ax.set_ylabel("validation perplexity / no skipping")
    ax.set_title("Retrieval skipping (thresholds annotated)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(rows: list[dict], path: Path) -> None:
    """Mean test perplexity over the store's domains against datastore bytes per stored token, one point per
    mode (log x); the parametric LM (no datastore) as a horizontal line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for r in rows:
        y = r.get("mean perplexity")
        if y is None:
            continue
        if r["mode"] == "parametric":
            ax.axhline(y, color="gray", ls=":", label=f"parametric ({y:.1f})")
            continue
        marker = "s" if r["mode"].startswith("RIC") else "^" if "inf-gram" in r["mode"] else "o"
        ax.scatter([r["bytes per token"]], [y], marker=marker, s=40, label=f"{r['mode']} ({y:.1f})")
        ax.annotate(f"{r['bytes per token']:.1f} B", (r["bytes per token"], y), fontsize=6, xytext=(4, 3),
                    textcoords="offset points")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.margins(x=0.15)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("datastore bytes per stored token on disk (log scale)")
    ax.set_ylabel("test perplexity, mean over the store's domains")
    ax.set_title("Perplexity against datastore size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
