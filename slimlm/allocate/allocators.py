"""Per-layer budgets at a global target: per-FQN scores -> per-FQN budgets.

Every allocator is ``f(scores, sizes, target, **options) -> dict[fqn, budget]`` where ``scores`` and ``sizes``
(parameter counts) are keyed by module FQN (``model.layers.3.mlp.down_proj``). The invariant, enforced by
``clip_and_renormalize`` at the end of every allocator: each budget lies in [lo, hi] and the parameter-weighted
mean Σ nᵢ bᵢ / Σ nᵢ equals ``target``.

Budget units: sparsity (fraction of zeros; higher = more compression), average bits or kept-rank ratio (higher =
less compression). Allocators decide which layers are *important* and give them less compression; the option
``higher_is_more_compression`` (True for sparsity, False for bits/rank ratio) turns that into the budget's sign,
so one allocator serves pruning, quantization and low-rank alike. Budgets are continuous; rounding to discrete
units (bits) is the caller's job.

References:
- OWL: Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024 (repo luuyin/OWL, lib/prune_all.py).
- AlphaPruning: Lu et al., NeurIPS 2024 (repo haiquanlu/AlphaPruning, lib/prune.py ``ww_sparsity``).
- Everett, "Generalized Lagrange multiplier method for solving problems of optimum allocation of resources",
  Operations Research 11 (1963): the convex-hull/Lagrangian argument behind ``solve_error_table``.
"""

import math
from typing import Sequence

import torch

from slimlm.core.architectures import BLOCK_PATTERN, block_of
from slimlm.errors import SlimlmError, lookup, unknown

SPARSITY_BOUNDS = (0.0, 0.99)  # never prune a whole layer: 100% would cut the residual branch entirely
TARGET_RTOL = 1e-3  # the allocation contract: weighted mean within 0.1% of the target
OWL_LAMBDA = 0.08  # OWL README and main.py --Lamda: sparsities span [S − λ, S + λ]
ALPHA_EPSILON = 0.2  # AlphaPruning scripts/llama_7b.sh for Wanda and SparseGPT (README example: 0.3)


def _check(scores: dict[str, float] | None, sizes: dict[str, int]) -> None:
    if scores is not None and set(scores) != set(sizes):
        diff = sorted(set(scores) ^ set(sizes))
        raise SlimlmError(f"scores and sizes must have the same FQNs; these appear in only one: {diff[:5]}")
    bad = [n for n in sizes if sizes[n] <= 0 or (scores is not None and not math.isfinite(scores[n]))]
    if bad:
        raise SlimlmError(f"need a positive size and a finite score for every layer; fix or drop: {bad[:5]}")


def _vector(values: dict[str, float], names: list[str]) -> torch.Tensor:
    return torch.tensor([float(values[n]) for n in names], dtype=torch.float64)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor) -> float:
    return ((w * x).sum() / w.sum()).item()


def block_mean(scores: dict[str, float], pattern: str = BLOCK_PATTERN) -> dict[str, float]:
    """Each FQN's score replaced by the unweighted mean over its block (AlphaPruning's ``block_wise`` mapping)."""
    block = {fqn: block_of(fqn, pattern) for fqn in scores}
    groups: dict[str, list[float]] = {}
    for fqn, s in scores.items():
        groups.setdefault(block[fqn], []).append(s)
    return {fqn: sum(groups[block[fqn]]) / len(groups[block[fqn]]) for fqn in scores}


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """x scaled to [0, 1]; all zeros when x is constant (no information -> uniform allocation)."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def clip_and_renormalize(
    budgets: dict[str, float], sizes: dict[str, int], target: float, lo: float = 0.0, hi: float = 0.99
) -> dict[str, float]:
    """Clip every budget to [lo, hi] while keeping the parameter-weighted mean at ``target``.

    Finds the one additive shift c with Σ nᵢ·clip(bᵢ + c, lo, hi) / Σ nᵢ = target by bisection (water-filling):
    the left side is continuous and non-decreasing in c, equal to lo for c ≤ lo − max b and to hi for
    c ≥ hi − min b, so a root exists iff lo ≤ target ≤ hi. Unclipped layers keep their differences; a shift
    (not a rescale) is used because it means the same thing for every budget unit. When nothing needs clipping
    and the mean is already right, c = 0 and the budgets come back unchanged.
    """
    _check(budgets, sizes)
    if not lo <= target <= hi:
        raise SlimlmError(f"target {target} is outside the per-layer bounds [{lo}, {hi}]; widen the bounds")
    names = list(sizes)
    b, w = _vector(budgets, names), _vector(sizes, names)
    if b.min() >= lo and b.max() <= hi and abs(_weighted_mean(b, w) - target) <= 1e-12 * max(1.0, abs(target)):
        return {n: float(v) for n, v in zip(names, b)}
    c_lo, c_hi = lo - b.max().item(), hi - b.min().item()
    for _ in range(200):  # the bracket halves each step: 200 steps reach float64 resolution
        c = (c_lo + c_hi) / 2
        if _weighted_mean((b + c).clamp(lo, hi), w) < target:
            c_lo = c
        else:
            c_hi = c
    out = (b + (c_lo + c_hi) / 2).clamp(lo, hi)
    assert abs(_weighted_mean(out, w) - target) <= TARGET_RTOL * max(abs(target), 1e-6)
    return {n: float(v) for n, v in zip(names, out)}


def uniform(
    scores: dict[str, float] | None, sizes: dict[str, int], target: float, *, lo: float = 0.0, hi: float = 0.99
) -> dict[str, float]:
    """The same budget for every layer (scores are ignored)."""
    _check(None, sizes)
    return clip_and_renormalize({n: target for n in sizes}, sizes, target, lo, hi)


def owl(
    scores: dict[str, float],
    sizes: dict[str, int],
    target: float,
    *,
    lamda: float = OWL_LAMBDA,
    block_wise: bool = True,
    higher_is_more_compression: bool = True,
    lo: float = 0.0,
    hi: float = 0.99,
    block_pattern: str = BLOCK_PATTERN,
) -> dict[str, float]:
    """OWL: blocks with more activation outliers are more important and get less compression.

    scores: each linear's outlier ratio LOD (``analysis.activations.owl_outlier_ratio`` with M = ``analysis.activations.OWL_M`` = 5, the OWL
    README's 70% recipe; its main.py default is 3). OWL computes one LOD per block over the concatenated scores of
    all its linears; pass that value for each linear of the block (the block mean below then leaves it unchanged).
    With ``block_wise=False`` each linear keeps its own score.

    OWL §4: r = (LOD − min)/(max − min)·2λ, density = r − mean(r) + (1 − S), i.e. sparsity = S − (r − mean r),
    spanning [S − λ, S + λ]. The mean is parameter-weighted here (OWL's plain mean over equal-size blocks is the
    same thing), so the target holds before clipping too. ``lamda`` is in budget units (0.08 = 8 points of
    sparsity; for bits choose something like 0.5).
    """
    _check(scores, sizes)
    names = list(sizes)
    lod = _vector(block_mean(scores, block_pattern) if block_wise else scores, names)
    r = 2 * lamda * _minmax(lod)
    offset = r - _weighted_mean(r, _vector(sizes, names))  # > 0: more outliers than average, more important
    sign = -1.0 if higher_is_more_compression else 1.0
    budgets = {n: target + sign * d.item() for n, d in zip(names, offset)}
    return clip_and_renormalize(budgets, sizes, target, lo, hi)


def alphapruning(
    scores: dict[str, float],
    sizes: dict[str, int],
    target: float,
    *,
    epsilon: float = ALPHA_EPSILON,
    block_wise: bool = True,
    higher_is_more_compression: bool = True,
    lo: float = 0.0,
    hi: float = 0.99,
    block_pattern: str = BLOCK_PATTERN,
) -> dict[str, float]:
    """AlphaPruning: layers with a heavier-tailed ESD (smaller alpha) are better trained and get less compression.

    scores: each linear's ``alpha`` from ``analysis.spectra.weight_metrics`` (PL_Alpha_Hill, xmin_peak). With
    ``block_wise`` (the paper's default mapping) alpha is first averaged over each block's linears.
    Mapping (lib/prune.py ``ww_sparsity``): ratio = (α − α_min)/(α_max − α_min)·(s2 − s1) + s1 with
    s1 = 1 − ε, s2 = 1 + ε, then budget = S·ratio / (parameter-weighted mean of ratio). For budgets where higher
    means less compression the ratio is mirrored, so small alpha gets *more* bits (AlphaPruning#1).

    Default ε = 0.2: the value the paper's LLaMA-7B script uses for Wanda and SparseGPT (the README's Llama-2-7B
    Wanda example uses 0.3, magnitude runs 0.3-0.5). At S = 0.8, ε ≥ 0.25 pushes the top block past 100%; an
    outlier alpha (~18 seen on the built-in model) squeezes every other block towards 1 − ε. Both are why the
    result is clipped and renormalised, which the paper's code does not do.
    """
    _check(scores, sizes)
    if not 0 <= epsilon < 1:
        raise SlimlmError(f"epsilon must be in [0, 1) so every ratio 1 ± epsilon stays positive, got {epsilon}")
    names = list(sizes)
    alpha = _vector(block_mean(scores, block_pattern) if block_wise else scores, names)
    t = _minmax(alpha)  # 0 = heaviest tail = most important
    if not higher_is_more_compression:
        t = 1 - t
    ratio = (1 - epsilon) + 2 * epsilon * t
    scale = target / _weighted_mean(ratio, _vector(sizes, names))
    budgets = {n: scale * r.item() for n, r in zip(names, ratio)}
    return clip_and_renormalize(budgets, sizes, target, lo, hi)


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (budget, error) points, left to right (Andrew's monotone chain).

    Collinear middle points are dropped, so the hull's slopes strictly increase.
    """
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) > 0:
                break
            hull.pop()
        hull.append(p)
    return hull


def solve_error_table(
    errors: dict[str, dict[float, float]],
    sizes: dict[str, int],
    target: float,
    levels: Sequence[float] | None = None,
) -> dict[str, float]:
    """Minimise Σ errorᵢ(bᵢ) subject to Σ nᵢ bᵢ / Σ nᵢ = target, from measured per-layer error tables.

    errors[fqn][level] is the error measured with that layer alone compressed at ``level`` (e.g. sparsity 0, 0.05,
    ..., 0.95); ``levels`` restricts the candidates (default: every level in each table). Direction-free: it
    works for sparsity and for bits alike, since only the errors say which way is costly.

    Method (Everett 1963): every layer starts at its lowest level; the budget still needed is bought in segments
    of the layers' lower convex hulls, cheapest error per unit of Σ nᵢbᵢ first. Hull slopes increase within a
    layer, so one global sort keeps each layer's segments in order. This is exactly the Lagrangian sweep
    min Σ eᵢ(bᵢ) + λ Σ nᵢbᵢ over λ with the remainder filled at the critical λ, without a bisection: it is optimal
    for the problem where a layer may sit between two neighbouring hull levels with linearly interpolated error.
    At most the last layer bought ends between levels (e.g. sparsity 0.675); every other layer gets a measured
    level. Non-convex parts of a table (levels above the hull) are never chosen.
    """
    _check(None, sizes)
    if set(errors) != set(sizes):
        raise SlimlmError(f"errors and sizes must have the same FQNs; differing: {sorted(set(errors) ^ set(sizes))[:5]}")
    if levels is not None and (missing := [n for n in sizes if any(b not in errors[n] for b in levels)]):
        raise SlimlmError(f"these layers have no measured error at some of the levels {list(levels)}: {missing[:5]}")
    hulls = {n: _lower_hull([(b, errors[n][b]) for b in (levels if levels is not None else errors[n])]) for n in sizes}
    total = sum(sizes.values())
    budget = {n: hulls[n][0][0] for n in sizes}
    lo_mean = sum(sizes[n] * budget[n] for n in sizes) / total
    hi_mean = sum(sizes[n] * hulls[n][-1][0] for n in sizes) / total
    if not lo_mean - 1e-12 <= target <= hi_mean + 1e-12:
        raise SlimlmError(f"target {target} is outside what the levels can reach, [{lo_mean:.4g}, {hi_mean:.4g}]")
    segments = sorted(
        ((e1 - e0) / (sizes[n] * (b1 - b0)), i, k, n, b0, b1)
        for i, n in enumerate(sizes)
        for k, ((b0, e0), (b1, e1)) in enumerate(zip(hulls[n], hulls[n][1:]))
    )
    need = (target - lo_mean) * total  # Σ nᵢbᵢ still to buy
    for *_, n, b0, b1 in segments:
        if need <= 1e-12 * total:
            break
        cap = sizes[n] * (b1 - b0)
        budget[n] = b1 if need >= cap * (1 - 1e-12) else b0 + need / sizes[n]
        need -= cap
    return budget


def errortable(
    scores: dict[str, dict[float, float]],
    sizes: dict[str, int],
    target: float,
    *,
    lo: float = 0.0,
    hi: float = 0.99,
    higher_is_more_compression: bool = True,
) -> dict[str, float]:
    """slimlm's allocator: spend the budget where it measurably costs least.

    scores: per layer, the relative output error measured on the calibration data at each sparsity level
    (``analysis.sensitivity.pruning_error_table``: that layer alone Wanda-pruned, ‖XΔWᵀ‖²/‖XWᵀ‖²). The budget map
    minimises the summed error under the parameter-weighted target (``solve_error_table``), so layers whose
    error rises slowly (redundant ones) are pruned more, and small but sensitive layers are kept dense.
    Unlike OWL and AlphaPruning it needs no range hyperparameter: the measured curves set the spread.
    Levels outside [lo, hi] are not candidates. Sparsity only: bit tables need quantization errors.
    """
    if not higher_is_more_compression:
        raise SlimlmError("the errortable allocator measures pruning errors; use it for sparsity budgets")
    tables = {n: {lvl: e for lvl, e in t.items() if lo <= lvl <= hi} for n, t in scores.items()}
    return clip_and_renormalize(solve_error_table(tables, sizes, target), sizes, target, lo, hi)


def fisher(
    scores: dict[str, dict[float, float]],
    sizes: dict[str, int],
    target: float,
    *,
    block_wise: bool = True,
    lo: float = 0.0,
    hi: float = 0.99,
    higher_is_more_compression: bool = True,
    block_pattern: str = BLOCK_PATTERN,
) -> dict[str, float]:
    """slimlm's allocator: minimise the estimated end-to-end loss increase under the global budget.

    scores: per linear, ``analysis.sensitivity.fisher_tables`` (Optimal Brain Damage cost ½·Σ F_ij·w_ij² of the weights Wanda
    would remove at each sparsity level, F the empirical Fisher of the calibration loss), or for bit budgets
    ``analysis.sensitivity.fisher_bit_tables`` (½·Σ F_ij·(w_ij − q_ij)² at each bit-width). Unlike the local
    ``errortable``, the Fisher carries how much each layer's change moves the model's loss, through every later
    block. With ``block_wise`` (default) the tables of a block's linears are summed and every linear of the block
    gets the block's level, as AlphaPruning and OWL also allocate per block: a diagonal Fisher is a coarse
    estimate for a single matrix at high sparsity, and pooling a block's seven matrices steadies it.
    ``analysis.sensitivity.fisher_sparsegpt_tables`` (SparseGPT's own changes, priced with the layer's full input Hessian) are
    per-matrix estimates of what SparseGPT will do, so ``allocate_from_metrics`` solves them per linear
    (``block_wise=False``); on the built-in model at 70% that gave SparseGPT 114.3 perplexity against 139.3 per
    block (and 135.7 with the Wanda-priced tables per block).
    """
    if not block_wise:
        return errortable(scores, sizes, target, lo=lo, hi=hi)
    blocks: dict[str, dict[float, float]] = {}
    block_sizes: dict[str, int] = {}
    for n, table in scores.items():
        b = block_of(n, block_pattern)
        block_sizes[b] = block_sizes.get(b, 0) + sizes[n]
        summed = blocks.setdefault(b, {})
        for level, e in table.items():
            if lo <= level <= hi:
                summed[level] = summed.get(level, 0.0) + e
    solved = solve_error_table(blocks, block_sizes, target)
    return clip_and_renormalize({n: solved[block_of(n, block_pattern)] for n in sizes}, sizes, target, lo, hi)


ALLOCATORS = {"uniform": uniform, "owl": owl, "alphapruning": alphapruning, "errortable": errortable,
              "fisher": fisher}
# which analysis metric each allocator reads (analysis.model_weight_metrics / calibration_metrics / fisher_tables)
ALLOCATOR_METRIC = {"uniform": None, "owl": "owl_lod", "alphapruning": "alpha", "errortable": "errors",
                    "fisher": "fisher"}
BIT_LEVELS = (2, 3, 4, 5, 6, 8)  # the bit-widths mixed precision chooses from (``round_bits``)
# budget unit -> (bounds, higher_is_more_compression)
UNITS = {"sparsity": (SPARSITY_BOUNDS, True), "bits": ((2.0, 8.0), False), "rank": ((0.01, 1.0), False)}


def parse_target(text: str) -> tuple[str, float]:
    """'sparsity=0.7' / 'bits=3.5' / 'rank=0.5' -> (unit, value)."""
    unit, _, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        raise SlimlmError(f"target must look like sparsity=0.7, bits=3.5 or rank=0.5, got '{text}'") from None
    if unit not in UNITS:
        raise SlimlmError(f"unknown budget unit '{unit}'; use one of {', '.join(UNITS)}")
    (lo, hi), _ = UNITS[unit]
    if not lo <= number <= hi:
        raise SlimlmError(f"{unit} target {number} is outside [{lo}, {hi}]")
    return unit, number


def allocate_from_metrics(metrics: dict[str, dict], allocation: str, target: float, unit: str = "sparsity",
                          **options) -> dict[str, float]:
    """Budget map FQN -> budget from per-layer metric records (each needs ``size`` and the allocator's metric).

    ``options`` go to the allocator (``lamda`` for owl, ``epsilon`` for alphapruning).
    """
    if allocation not in ALLOCATORS:
        raise unknown("allocation", allocation, ALLOCATORS)
    key = ALLOCATOR_METRIC[allocation]
    if key == "fisher" and unit != "sparsity":
        if unit != "bits":
            raise SlimlmError(f"allocation 'fisher' measures sparsity and bit budgets, not {unit}")
        key = "fisher_bits"
    missing = [n for n, r in metrics.items() if key is not None and key not in r]
    if missing:
        raise SlimlmError(f"allocation '{allocation}' needs the '{key}' metric, missing for {missing[0]}; "
                          "run the analysis with calibration data")
    if key == "fisher" and any(r.get("fisher_for") == "sparsegpt" for r in metrics.values()):
        options.setdefault("block_wise", False)  # SparseGPT-priced tables are per-matrix estimates (see fisher)
    sizes = {n: int(r["size"]) for n, r in metrics.items()}
    (lo, hi), more = UNITS[unit]
    scores = {n: _table(r[key]) if isinstance(r[key], dict) else r[key] for n, r in metrics.items()} if key else None
    kwargs = dict(lo=lo, hi=hi, **options)
    if allocation != "uniform":
        kwargs["higher_is_more_compression"] = more
    return lookup(ALLOCATORS, allocation, "allocation")(scores, sizes, target, **kwargs)


def _table(errors: dict) -> dict[float, float]:
    """An error table with float levels (JSON turns the keys into strings)."""
    return {float(level): float(e) for level, e in errors.items()}


def round_bits(budgets: dict[str, float], sizes: dict[str, int], choices=BIT_LEVELS) -> dict[str, int]:
    """Integer bit-widths from continuous ones, keeping the parameter-weighted mean at or just under theirs.

    Every layer starts at the largest choice not above its budget; then layers are raised to the next choice,
    the ones that lost the most first, while the average stays within the budget.
    """
    choices = sorted(choices)
    target = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
    bits = {n: max([c for c in choices if c <= b + 1e-9] or choices[:1]) for n, b in budgets.items()}
    spent = sum(bits[n] * sizes[n] for n in bits)
    limit = target * sum(sizes.values())
    for n in sorted(budgets, key=lambda n: bits[n] - budgets[n]):  # most rounded down first
        higher = [c for c in choices if c > bits[n]]
        if higher and spent + (higher[0] - bits[n]) * sizes[n] <= limit + 1e-6:
            spent += (higher[0] - bits[n]) * sizes[n]
            bits[n] = higher[0]
    return bits
