"""PNG plots of analyses, budgets and sweeps (matplotlib, headless)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

# figure sizes (inches) for half the report's width and all of it; its page shows them at ~2/3 of their pixels
HALF, FULL = (6.8, 4.2), (13.6, 4.0)
DPI = 150
# log-axis ticks at round numbers: the coarsest mantissa set giving enough ticks over the axis' range
MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9))
MARKERS = "osD^vP*Xh<>p"


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SlimlmError("plots need matplotlib: `pip install matplotlib`") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


def plain(value: float) -> str:
    """A tick label as a plain decimal: 24.6, 30, 100, 1000 (never 2.46e1 or 2.46×10¹)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")


def log_ticks(lo: float, hi: float, fewest: int = 3) -> list[float]:
    """Round tick values in [lo, hi] for a log axis: 1-2-5 steps and the like, finer as the range narrows;
    below about a factor of two, evenly spaced round values (a log axis is nearly linear there)."""
    from matplotlib.ticker import MaxNLocator

    decades = range(math.floor(math.log10(lo)), math.floor(math.log10(hi)) + 1)
    for mantissas in MANTISSAS:
        ticks = [m * 10.0 ** e for e in decades for m in mantissas if lo <= m * 10.0 ** e <= hi]
        if len(ticks) >= fewest:
            return ticks
    return [t for t in MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]


def log_axis(ax, values: list[float]) -> None:
    """Log-scale y axis over ``values`` (with a margin) labelled with plain decimals at round numbers.
    Matplotlib's own log labels read "2.46×10¹" once the range spans less than a decade."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    margin = max(1.05, (max(values) / min(values)) ** 0.06)
    lo, hi = min(values) / margin, max(values) * margin
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: plain(v)))
    ax.yaxis.set_minor_formatter(NullFormatter())


def alpha_depth(metrics: dict[str, dict], path: str | Path, key: str = "alpha", figsize=(8, 4.5)) -> None:
    """``key`` (heavy-tail alpha by default) per block across depth, one line per linear type."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    for kind in sorted({r["kind"] for r in metrics.values()}):
        rows = sorted((r["block"], r[key]) for r in metrics.values() if r["kind"] == kind)
        ax.plot([b for b, _ in rows], [v for _, v in rows], marker="o", ms=3, label=kind)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    _save(fig, path)


def esd(eigs: torch.Tensor, alpha: float, xmin: float, name: str, path: str | Path) -> None:
    """Log-log histogram of one layer's ESD with its fitted power law p(λ) ∝ λ^-alpha above xmin."""
    plt = _pyplot()
    lam = eigs[eigs > 0].double()
    edges = torch.logspace(lam.min().log10().item(), lam.max().log10().item(), 60, dtype=torch.float64)
    counts = torch.histogram(lam, bins=edges).hist
    density = counts / (counts.sum() * (edges[1:] - edges[:-1]))
    centers = (edges[1:] * edges[:-1]).sqrt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(centers[density > 0], density[density > 0], "o", ms=3, label="ESD")
    tail = lam[lam >= xmin]
    x = torch.logspace(torch.log10(torch.tensor(xmin)).item(), lam.max().log10().item(), 50, dtype=torch.float64)
    # the fitted tail density, normalised to the tail's share of all eigenvalues
    fit = (tail.numel() / lam.numel()) * (alpha - 1) / xmin * (x / xmin) ** (-alpha)
    ax.loglog(x, fit, "-", label=f"power law alpha={alpha:.2f}")
    ax.axvline(xmin, color="gray", ls="--", label=f"xmin={xmin:.3g}")
    ax.set_xlabel("eigenvalue of WᵀW")
    ax.set_ylabel("density")
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def budgets(maps: dict[str, dict[str, float]], path: str | Path, unit: str = "sparsity",
            title: str | None = None) -> None:
    """Per-layer budgets of several allocators side by side (layers in model order)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, budget in maps.items():
        ax.plot(range(len(budget)), list(budget.values()), lw=1, label=name)
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel(unit)
    ax.set_title(title or f"per-layer {unit} by allocator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def budget_panels(panels: dict[str, dict[str, list[float]]], path: str | Path, unit: str) -> None:
    """Per-layer budgets across the page: one panel per allocation, one line per budget asked in it
    (``panels``: title -> line label -> budgets in model order; lines coloured in the order given)."""
    plt = _pyplot()
    rows = math.ceil(len(panels) / 4)  # at most four panels a row, rows filled evenly
    cols = math.ceil(len(panels) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(FULL[0], 0.4 + 2.8 * rows), sharey=True, squeeze=False,
                             layout="constrained")
    for ax, (title, lines) in zip(axes.flat, panels.items()):
        colors = plt.get_cmap("viridis")([i / max(len(lines) - 1, 1) * 0.85 for i in range(len(lines))])
        for color, (label, budget) in zip(colors, lines.items()):
            ax.plot(range(len(budget)), budget, color=color, lw=1.2, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("linear layer (model order)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncols=1 + len(lines) // 6)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(unit)
    _save(fig, path)


def sweep_figure(rows: list[dict], x: str = "sparsity", ylabel: str = "perplexity", figsize=HALF):
    """Perplexity (log scale) against ``x``: colour = method, marker = ``allocation`` (the series label).
    A series of two or more runs is a line; a lone run is a marker only: a line needs two points."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    methods = sorted({r["method"] for r in rows})
    series = sorted({r["allocation"] for r in rows})
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(series)}
    for method, label in sorted({(r["method"], r["allocation"]) for r in rows}):
        pts = sorted((r[x], r["perplexity"]) for r in rows if (r["method"], r["allocation"]) == (method, label))
        ax.plot([p for p, _ in pts], [q for _, q in pts], color=color[method], marker=marker[label], ms=6,
                ls="-" if len(pts) > 1 else "none", lw=1.4)
    log_axis(ax, [r["perplexity"] for r in rows])
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    headings = [Line2D([], [], ls="none", label="method")] + [
        Line2D([], [], color=color[m], lw=2, label=m) for m in methods] + [
        Line2D([], [], ls="none", label="series")] + [
        Line2D([], [], color="0.35", marker=marker[s], ls="none", label=s) for s in series]
    legend = fig.legend(handles=headings, loc="outside right upper", fontsize=8, frameon=False,
                        ncols=1 + len(headings) // 24)
    for i in (0, len(methods) + 1):
        legend.get_texts()[i].set_fontweight("bold")
    return fig


def sweep(rows: list[dict], path: str | Path, x: str = "sparsity", ylabel: str = "WikiText-2 perplexity",
          figsize=HALF) -> None:
    """``sweep_figure`` saved as a PNG (rows: method, allocation, ``x``, perplexity)."""
    _save(sweep_figure(rows, x, ylabel, figsize), path)
