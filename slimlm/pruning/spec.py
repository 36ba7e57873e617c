"""How to prune, apart from the per-layer sparsity: the pattern (unstructured or N:M), comparison group, channel
permutation, method options and an optional grid for joint sparse + quantized pruning.

N:M follows NVIDIA's convention: at most N non-zeros in every group of M consecutive input weights of a
row (2:4 keeps 2 of 4), so the sparsity is 1 - N/M.
"""
from __future__ import annotations

from dataclasses import dataclass

from slimlm.core.budgets import apply_overrides
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid


GROUPS = ("row", "matrix")


@dataclass(frozen=True)
class PruneSpec:
    """How to prune; the per-layer sparsity comes separately (it may differ per layer).

    ``nm``: (N, M) for N:M, None for unstructured. ``group``: 'row'/'matrix'/None (the paper's).
    ``permute``: channel permutation before N:M (RIA's channel reallocation + assignment refinement).
    ``ria_alpha``: RIA's activation exponent a (paper default 0.5). ``blocksize``/``damp``: SparseGPT's
    column block (128) and dampening as a fraction of the mean Hessian diagonal (0.01).
    ``grid``: also quantize the kept weights (joint sparse + quantized): SparseGPT quantizes inside its
    OBS sweep, so the error of quantizing is compensated too; score methods round the kept weights (RTN).
    """

    nm: tuple[int, int] | None = None
    group: str | None = None
    permute: bool = False
    ria_alpha: float = 0.5
    blocksize: int = 128
    damp: float = 0.01
    grid: QuantGrid | None = None

    def __post_init__(self):
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise SlimlmError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        if self.group not in (None, *GROUPS):
            raise SlimlmError(f"unknown comparison group '{self.group}': use row or matrix")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'unstructured' or None -> None; 'N:M' -> (N, M)."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise SlimlmError(f"pattern must be 'unstructured' or N:M like 2:4, got '{pattern}'") from None
    PruneSpec(nm=(n, m))  # validates
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise SlimlmError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def check_budget_options(pattern, nm, sparsity, allocation, budgets, overrides, layers=None) -> None:
    """Options that would contradict each other are errors, never silently dropped (the manifest and the recipe
    must say what was done). Without the model's ``layers`` (FQNs), only what does not depend on them."""
    if nm is not None:
        given = [name for name, on in (("sparsity", sparsity is not None), ("allocation", allocation != "uniform"),
                                       ("budgets", budgets is not None), ("override", bool(overrides))) if on]
        if given:
            raise SlimlmError(f"pattern {pattern} fixes every layer's sparsity at {1 - nm[0] / nm[1]:g}; "
                              f"drop {', '.join(given)}")
    if budgets is not None and allocation != "uniform":
        raise SlimlmError(f"a budgets map replaces the allocator; drop allocation '{allocation}' or the budgets")
    for value in (overrides or {}).values():
        check_sparsity(value)
    if layers is None:
        return
    if budgets is not None and sparsity is not None and set(layers) <= set(budgets):
        raise SlimlmError("the budgets map sets every layer, so sparsity would be ignored; drop sparsity")
    apply_overrides(dict.fromkeys(layers), overrides)  # a regex that matches no layer fails before any work
