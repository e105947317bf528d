"""The report's figures: matplotlib (Agg, object API: no pyplot global state), embedded as base64 PNG so the
HTML stays one self-contained file."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np
from matplotlib.figure import Figure

COLORS = {"real": "#4c4c9d", "synthetic": "#d95f02", "holdout": "#1b9e77"}
PEER_COLORS = ("#e7298a", "#66a61e", "#a6761d", "#1f78b4", "#666666")
FIGSIZE = (4.6, 3.4)  # inches; at DPI about 500 x 375 px: two side by side on a laptop screen
DPI = 110
DECADES_FOR_LOG = 2.0  # use a log axis when the positive values span more than this many decades


def color(name: str, index: int = 0) -> str:
    return COLORS.get(name) or PEER_COLORS[index % len(PEER_COLORS)]


def embed(fig: Figure, alt: str) -> str:
    """The figure as an <img> with a base64 PNG data URI (no file, no fetch)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="fig" src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _spans_decades(values: np.ndarray) -> bool:
    pos = values[np.isfinite(values) & (values > 0)]
    return len(pos) > 1 and math.log10(pos.max() / pos.min()) > DECADES_FOR_LOG


def scatter(series: Mapping[str, Sequence[Sequence[float]]], title: str, xlabel: str, ylabel: str) -> str:
    """One point per code (or pair): x = the statistic in the real data, y = in the other cohort; the diagonal is
    a perfect match. Log axes when the values span decades; zeros (a code one side lacks) are drawn as crosses on
    the axis floor so they stay visible."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    allv = np.array([v for pts in series.values() for p in pts for v in p], float)
    log = bool(allv.size) and _spans_decades(allv)
    floor = float(allv[allv > 0].min()) / 2 if log else 0.0
    for i, (name, pts) in enumerate(series.items()):
        arr = np.asarray(pts, float).reshape(-1, 2)
        zero = (arr <= 0).any(axis=1) if log else np.zeros(len(arr), bool)
        ax.scatter(arr[~zero, 0], arr[~zero, 1], s=14, alpha=0.65, color=color(name, i),
                   label=f"{name} ({len(arr)})", edgecolors="none")
        if zero.any():
            z = np.maximum(arr[zero], floor)
            ax.scatter(z[:, 0], z[:, 1], s=22, marker="x", color=color(name, i), label=f"{name}: 0 on one side")
    hi = float(np.nanmax(allv)) if allv.size else 1.0
    hi = hi if hi > 0 else 1.0
    ax.plot([floor, hi], [floor, hi], ls="--", lw=1, color="#888", label="perfect match")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel + (" (log scale)" if log else ""), ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return embed(fig, f"{title}: {xlabel} against {ylabel}" + (" (log axes)" if log else ""))


def histogram(samples: Mapping[str, Sequence[float]], title: str, xlabel: str) -> str:
    """Share of values per bin for each cohort on common bins (1st-99th percentile of all values); a log x axis
    with log-spaced bins when the values span decades."""
    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    arrays = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in samples.items()}
    allv = np.concatenate([a for a in arrays.values() if a.size] or [np.zeros(1)])
    log = _spans_decades(allv) and (allv > 0).mean() > 0.9
    sizes = [a.size for a in arrays.values() if a.size]
    n_bins = int(np.clip(1.5 * math.sqrt(min(sizes)), 8, 30)) if sizes else 10  # few values: fewer, wider bins
    if log:
        pos = allv[allv > 0]
        lo, hi = np.percentile(pos, [1, 99])
        edges = np.geomspace(lo, max(hi, lo * 1.01), n_bins + 1)
        ax.set_xscale("log")
    else:
        lo, hi = np.percentile(allv, [1, 99]) if allv.size > 1 else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        edges = np.linspace(lo, hi, n_bins + 1)
    for i, (name, a) in enumerate(arrays.items()):
        if not a.size:
            continue
        clipped = np.clip(a, edges[0], edges[-1])
        ax.hist(clipped, bins=edges, weights=np.full(len(a), 1 / len(a)), histtype="step", lw=1.6,
                color=color(name, i), label=f"{name} (n={len(a)})")
    ax.set(title=title, xlabel=xlabel + (" (log scale)" if log else ""), ylabel="share of values per bin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return embed(fig, f"{title}: histogram of {xlabel}" + (" (log x axis)" if log else ""))


def curve(points: Mapping[str, Sequence[tuple[str, float, float | None]]], reference: Mapping[str, float | None],
          ideal: Mapping[str, float | None]) -> str:
    """Privacy-utility curve: one panel per metric, each generator (column, epsilon, value) a coloured marker
    against epsilon (log axis; ε = ∞, no DP, drawn at the right edge), a grey line through them in order of
    epsilon, the holdout reference and the ideal as horizontal lines; one legend for the figure."""
    metrics = [m for m, pts in points.items() if any(v is not None for *_, v in pts)]
    names = list(dict.fromkeys(n for m in metrics for n, *_ in points[m]))
    finite = [e for m in metrics for _, e, _ in points[m] if math.isfinite(e)]
    inf_at = max(finite) * 4 if finite else 10.0  # where "no DP" sits on the log axis
    ncols = min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / 3)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows + 0.5))
    handles: dict[str, object] = {}
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = sorted((inf_at if math.isinf(e) else e, v, n) for n, e, v in points[m] if v is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#bbb", lw=1, zorder=1)
        for x, v, n in pts:
            handles[n] = ax.scatter([x], [v], s=40, color=color(n, names.index(n)), zorder=2, label=n)
        if reference.get(m) is not None:
            handles["holdout (reference)"] = ax.axhline(reference[m], ls="--", color=COLORS["holdout"],
                                                        label="holdout (reference)")
        if ideal.get(m) is not None:
            handles["ideal"] = ax.axhline(ideal[m], ls=":", color="#888", label="ideal")
        ax.set_xscale("log")
        ticks = _spread(sorted({p[0] for p in pts}))
        ax.set_xticks(ticks, ["∞" if t == inf_at else f"{t:.3g}" for t in ticks])
        ax.minorticks_off()
        ax.set(title=m, xlabel="ε (∞ = no DP)")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))
    return embed(fig, "privacy-utility curve: " + ", ".join(metrics) + " against epsilon")


def _spread(ticks: list[float], min_ratio: float = 1.25) -> list[float]:
    """Ticks at least min_ratio apart on the log axis, so labels of near-equal epsilon do not overlap."""
    out: list[float] = []
    for t in ticks:
        if not out or t / out[-1] >= min_ratio:
            out.append(t)
    return out
