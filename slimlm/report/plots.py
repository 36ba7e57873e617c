"""PNG plots of analyses, budgets and sweeps (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import torch

from slimlm.errors import SlimlmError


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SlimlmError("plots need matplotlib: `pip install matplotlib`") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def alpha_depth(metrics: dict[str, dict], path: str | Path, key: str = "alpha") -> None:
    """``key`` (heavy-tail alpha by default) per block across depth, one line per linear type."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for kind in sorted({r["kind"] for r in metrics.values()}):
        rows = sorted((r["block"], r[key]) for r in metrics.values() if r["kind"] == kind)
        ax.plot([b for b, _ in rows], [v for _, v in rows], marker="o", ms=3, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel(key)
    ax.set_title(f"{key} per linear across depth")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sweep(rows: list[dict], path: str | Path, x: str = "sparsity") -> None:
    """Perplexity against ``x`` (sparsity or bits), one curve per (method, allocation); log-scale perplexity."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["allocation"]) for r in rows}):
        pts = sorted((r[x], r["perplexity"]) for r in rows if (r["method"], r["allocation"]) == key)
        ax.plot([s for s, _ in pts], [p for _, p in pts], marker="o", label=f"{key[0]} / {key[1]}")
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
