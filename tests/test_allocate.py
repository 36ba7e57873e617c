"""Allocator invariants (weighted mean = target, bounds, direction) and the error-table solver vs brute force."""

import itertools
import random

import pytest

from slimlm.allocate import (
    ALLOCATORS,
    alphapruning,
    block_mean,
    clip_and_renormalize,
    owl,
    solve_error_table,
    uniform,
)
from slimlm.core.architectures import block_of

# SmolLM2-135M-like block: (name, out, in)
LINEARS = [("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 192, 576), ("self_attn.v_proj", 192, 576),
           ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 1536, 576), ("mlp.up_proj", 1536, 576),
           ("mlp.down_proj", 576, 1536)]
BLOCKS = 8


def model_sizes(blocks: int = BLOCKS) -> dict[str, int]:
    # deliberately listed out of order: grouping must come from the names
    return {f"model.layers.{i}.{name}": o * n for name, o, n in LINEARS for i in reversed(range(blocks))}


def weighted_mean(budgets, sizes):
    return sum(budgets[n] * sizes[n] for n in sizes) / sum(sizes.values())


def per_block(values: list[float], sizes: dict[str, int]) -> dict[str, float]:
    return {fqn: values[int(fqn.split(".")[2])] for fqn in sizes}


def test_block_of_parses_names():
    assert block_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert block_of("model.decoder.layers.3.fc1") == "model.decoder.layers.3"
    assert block_of("transformer.h.0.attn.c_attn") == "transformer.h.0"
    assert block_of("lm_head") == "lm_head"
    scores = {"model.layers.1.a": 1.0, "model.layers.10.a": 5.0, "model.layers.1.b": 3.0}
    assert block_mean(scores) == {"model.layers.1.a": 2.0, "model.layers.10.a": 5.0, "model.layers.1.b": 2.0}


def test_uniform_and_registry():
    sizes = model_sizes()
    assert set(uniform(None, sizes, 0.5).values()) == {0.5}
    assert set(ALLOCATORS) == {"uniform", "owl", "alphapruning", "errortable", "fisher"}


def test_clip_and_renormalize_shifts_and_clips():
    sizes = {"a": 10, "b": 30, "c": 60}
    out = clip_and_renormalize({"a": 1.4, "b": 0.7, "c": 0.6}, sizes, 0.7, 0.0, 0.99)
    assert out["a"] == pytest.approx(0.99)
    assert out["b"] - out["c"] == pytest.approx(0.1)  # unclipped layers keep their difference
    assert weighted_mean(out, sizes) == pytest.approx(0.7, abs=1e-9)
    same = {"a": 0.6, "b": 0.8, "c": 0.7}
    assert clip_and_renormalize(same, sizes, 0.72) == same  # already valid: untouched
    with pytest.raises(ValueError, match="outside the per-layer bounds"):
        clip_and_renormalize(same, sizes, 0.995)


def test_owl_matches_paper_formula_and_direction():
    sizes = model_sizes()
    lod = [3.0, 9.0, 5.0, 1.0, 7.0, 2.0, 4.0, 6.0]  # one outlier ratio per block (percent, as OWL prints it)
    S, lam = 0.7, 0.08
    out = owl(per_block(lod, sizes), sizes, S)
    r = [(x - min(lod)) / (max(lod) - min(lod)) * 2 * lam for x in lod]
    expected = [1 - (ri - sum(r) / len(r) + (1 - S)) for ri in r]  # OWL: sparsity = 1 − density
    for fqn, v in out.items():
        assert v == pytest.approx(expected[int(fqn.split(".")[2])], abs=1e-12)
    assert weighted_mean(out, sizes) == pytest.approx(S, rel=1e-3)
    by_block = sorted(range(BLOCKS), key=lambda i: lod[i])
    sparsity = [out[f"model.layers.{i}.mlp.up_proj"] for i in by_block]
    assert sparsity == sorted(sparsity, reverse=True)  # more outliers -> less sparsity
    bits = owl(per_block(lod, sizes), sizes, 4.0, lamda=1.0, higher_is_more_compression=False, lo=2.0, hi=8.0)
    assert [bits[f"model.layers.{i}.mlp.up_proj"] for i in by_block] == sorted(bits.values())[:: len(LINEARS)]
    assert weighted_mean(bits, sizes) == pytest.approx(4.0, rel=1e-3)


def alpha_scores(sizes, block_alpha, seed=0):
    """Per-linear alpha = block value + a spread whose block mean is exactly zero."""
    rng = random.Random(seed)
    spread = [rng.uniform(-1, 1) for _ in LINEARS]
    spread = [s - sum(spread) / len(spread) for s in spread]
    names = [name for name, _, _ in LINEARS]
    return {fqn: block_alpha[int(fqn.split(".")[2])] + spread[names.index(fqn.split(".", 3)[3])] for fqn in sizes}


def test_alphapruning_matches_paper_formula_and_direction():
    sizes = model_sizes()
    block_alpha = [2.6, 3.0, 3.3, 2.9, 3.8, 4.2, 3.5, 4.0]
    S, eps = 0.7, 0.2
    out = alphapruning(alpha_scores(sizes, block_alpha), sizes, S, epsilon=eps)
    lo_a, hi_a = min(block_alpha), max(block_alpha)
    ratio = {f: (block_alpha[int(f.split(".")[2])] - lo_a) / (hi_a - lo_a) * 2 * eps + 1 - eps for f in sizes}
    scale = S * sum(sizes.values()) / sum(ratio[f] * sizes[f] for f in sizes)
    for fqn in sizes:
        assert out[fqn] == pytest.approx(ratio[fqn] * scale, abs=1e-12)
    order = sorted(range(BLOCKS), key=lambda i: block_alpha[i])
    sparsity = [out[f"model.layers.{i}.self_attn.q_proj"] for i in order]
    assert sparsity == sorted(sparsity)  # higher alpha -> higher sparsity
    bits = alphapruning(alpha_scores(sizes, block_alpha), sizes, 3.0, higher_is_more_compression=False, lo=2, hi=8)
    assert [bits[f"model.layers.{i}.self_attn.q_proj"] for i in order] == sorted(bits.values(), reverse=True)[:: 7]
    assert weighted_mean(bits, sizes) == pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("target", [0.5, 0.7, 0.8, 0.9])
def test_alphapruning_with_an_outlier_alpha_stays_in_bounds(target):
    sizes = model_sizes()
    block_alpha = [2.6, 3.0, 3.3, 2.9, 18.0, 4.2, 3.5, 4.0]  # pitfalls.md: ~18 seen on the built-in model
    out = alphapruning(alpha_scores(sizes, block_alpha), sizes, target, epsilon=0.3)
    assert all(0.0 <= v <= 0.99 for v in out.values())
    assert weighted_mean(out, sizes) == pytest.approx(target, rel=1e-3)
    order = sorted(range(BLOCKS), key=lambda i: block_alpha[i])
    sparsity = [out[f"model.layers.{i}.mlp.down_proj"] for i in order]
    assert sparsity == sorted(sparsity)


@pytest.mark.parametrize("name", sorted(set(ALLOCATORS) - {"errortable", "fisher"}))  # scalar-score allocators
def test_every_allocator_rejects_infeasible_targets_and_bad_scores(name):
    sizes = model_sizes(2)
    scores = {f: 1.0 + i for i, f in enumerate(sizes)}
    with pytest.raises(ValueError):
        ALLOCATORS[name](scores, sizes, 0.995)
    with pytest.raises(ValueError):
        ALLOCATORS[name](scores, sizes, -0.1)
    if name != "uniform":
        with pytest.raises(ValueError):
            ALLOCATORS[name]({**scores, "model.layers.0.mlp.up_proj": float("nan")}, sizes, 0.5)
        with pytest.raises(ValueError):
            ALLOCATORS[name]({"x": 1.0}, sizes, 0.5)
        assert all(v == pytest.approx(0.5) for v in ALLOCATORS[name]({f: 2.0 for f in sizes}, sizes, 0.5).values())


def envelope(table: dict[float, float], b: float) -> float:
    """Lowest error reachable at budget b by mixing two measured levels (brute force over pairs)."""
    pts = sorted(table.items())
    best = min((e for x, e in pts if x == b), default=float("inf"))
    for (x0, e0), (x1, e1) in itertools.combinations(pts, 2):
        if x0 < b < x1:
            best = min(best, e0 + (e1 - e0) * (b - x0) / (x1 - x0))
    return best


def brute_force(errors, sizes, target, levels):
    names = list(sizes)
    total = sum(sizes.values())
    best = None
    for combo in itertools.product(levels, repeat=len(names)):
        if abs(sum(b * sizes[n] for b, n in zip(combo, names)) / total - target) < 1e-9:
            err = sum(errors[n][b] for b, n in zip(combo, names))
            best = min(best, err) if best is not None else err
    return best


def test_solver_equals_brute_force_on_convex_tables():
    rng = random.Random(0)
    levels = [0.0, 0.25, 0.5, 0.75, 1.0]
    sizes = {f"l{i}": 100 for i in range(4)}
    errors = {}
    for n in sizes:  # increasing convex: positive, increasing increments
        steps = sorted(rng.uniform(0.1, 2.0) for _ in levels[1:])
        errors[n] = dict(zip(levels, itertools.accumulate([0.0] + steps)))
    for target in [0.25, 0.5, 0.75]:
        out = solve_error_table(errors, sizes, target)
        assert all(b in levels for b in out.values())  # exact levels
        assert weighted_mean(out, sizes) == pytest.approx(target, abs=1e-12)
        assert sum(errors[n][out[n]] for n in sizes) == pytest.approx(brute_force(errors, sizes, target, levels))


@pytest.mark.parametrize("seed", range(5))
def test_solver_beats_brute_force_and_uniform_on_arbitrary_tables(seed):
    rng = random.Random(seed)
    levels = [0.0, 0.25, 0.5, 0.75]
    sizes = {"a": 1, "b": 1, "c": 2, "d": 2, "e": 3}
    errors = {n: {b: rng.uniform(0, 1) * b + rng.uniform(0, 0.3) for b in levels} for n in sizes}
    target = 0.5
    out = solve_error_table(errors, sizes, target)
    assert weighted_mean(out, sizes) == pytest.approx(target, rel=1e-3)
    assert sum(b not in levels for b in out.values()) <= 1  # at most one layer between levels
    relaxed = sum(envelope(errors[n], out[n]) for n in sizes)
    assert relaxed <= brute_force(errors, sizes, target, levels) + 1e-12
    assert relaxed <= sum(errors[n][target] for n in sizes) + 1e-12  # uniform


def test_solver_for_bits_where_error_falls_with_budget():
    levels = [2.0, 3.0, 4.0, 8.0]
    sizes = {"a": 1, "b": 1, "c": 1}
    errors = {n: {b: w * 4.0**-b for b in levels} for n, w in zip(sizes, [1.0, 10.0, 100.0])}
    out = solve_error_table(errors, sizes, 4.0)
    assert weighted_mean(out, sizes) == pytest.approx(4.0, rel=1e-3)
    assert sum(envelope(errors[n], out[n]) for n in sizes) <= brute_force(errors, sizes, 4.0, levels) + 1e-12
    assert out["c"] >= out["b"] >= out["a"]  # the most sensitive layer gets the most bits


def test_solver_rejects_unreachable_targets():
    errors = {"a": {0.0: 0.0, 0.5: 1.0}, "b": {0.0: 0.0, 0.5: 2.0}}
    with pytest.raises(ValueError, match="outside what the levels can reach"):
        solve_error_table(errors, {"a": 1, "b": 1}, 0.6)
    with pytest.raises(ValueError, match="no measured error"):
        solve_error_table(errors, {"a": 1, "b": 1}, 0.3, levels=[0.0, 0.25])


def test_errortable_prunes_redundant_layers_more_and_hits_target():
    from slimlm.allocate import allocate_from_metrics

    levels = [round(0.05 * i, 2) for i in range(20)]
    # layer "a" is redundant (error rises slowly), "c" is sensitive (error rises fast)
    metrics = {name: {"size": 1000, "errors": {str(l): k * l ** 2 for l in levels}}
               for name, k in (("a", 0.1), ("b", 1.0), ("c", 10.0))}
    budgets = allocate_from_metrics(metrics, "errortable", 0.6)
    assert budgets["a"] > budgets["b"] > budgets["c"]
    assert abs(sum(budgets.values()) / 3 - 0.6) <= 0.6e-3
    assert all(0 <= v <= 0.99 for v in budgets.values())
    with pytest.raises(ValueError):  # beyond the largest measured level
        allocate_from_metrics(metrics, "errortable", 0.97)


def test_allocate_from_metrics_checks_inputs():
    from slimlm.allocate import allocate_from_metrics, parse_target
    from slimlm.errors import SlimlmError

    with pytest.raises(SlimlmError, match="needs the 'owl_lod' metric"):
        allocate_from_metrics({"a": {"size": 10, "alpha": 3.0}}, "owl", 0.5)
    with pytest.raises(SlimlmError, match="unknown allocation"):
        allocate_from_metrics({"a": {"size": 10}}, "random", 0.5)
    assert parse_target("sparsity=0.7") == ("sparsity", 0.7)
    assert parse_target("bits=3.5") == ("bits", 3.5)
    for bad in ("sparsity=1.2", "bits=9", "density=0.5", "sparsity=abc"):
        with pytest.raises(SlimlmError):
            parse_target(bad)
    bits = allocate_from_metrics({"a": {"size": 10, "alpha": 2.0}, "b": {"size": 10, "alpha": 5.0}},
                                 "alphapruning", 4.0, unit="bits", block_wise=False)
    assert bits["a"] > bits["b"]  # heavier tail (smaller alpha) keeps more bits


def test_fisher_gives_each_block_one_level_and_spares_sensitive_blocks():
    from slimlm.allocate import allocate_from_metrics, errortable, fisher
    from slimlm.errors import SlimlmError

    sizes = model_sizes(4)
    levels = [round(0.05 * i, 2) for i in range(20)]
    steepness = [10.0, 1.0, 0.3, 3.0]  # block 0 most sensitive, block 2 least
    rng = random.Random(0)
    tables = {f: {l: steepness[int(f.split(".")[2])] * rng.uniform(0.5, 2) * sizes[f] * l ** 2 for l in levels}
              for f in sizes}
    budgets = fisher(tables, sizes, 0.7)
    block_level = {}
    for f, b in budgets.items():
        assert block_level.setdefault(block_of(f), b) == b  # one level per block
        assert 0 <= b <= 0.99
    assert block_level["model.layers.2"] > block_level["model.layers.1"] > block_level["model.layers.3"] > \
        block_level["model.layers.0"]
    assert abs(weighted_mean(budgets, sizes) - 0.7) <= 0.7e-3
    assert fisher(tables, sizes, 0.7, block_wise=False) == errortable(tables, sizes, 0.7)
    metrics = {f: {"size": sizes[f], "fisher": {str(l): e for l, e in t.items()}} for f, t in tables.items()}
    assert allocate_from_metrics(metrics, "fisher", 0.7) == pytest.approx(budgets)
    for record in metrics.values():  # tables that price SparseGPT's changes are solved per linear
        record["fisher_for"] = "sparsegpt"
    per_linear = allocate_from_metrics(metrics, "fisher", 0.7)
    assert per_linear == pytest.approx(errortable(tables, sizes, 0.7)) and per_linear != pytest.approx(budgets)
    with pytest.raises(SlimlmError, match="needs the 'fisher_bits' metric"):
        allocate_from_metrics(metrics, "fisher", 4.0, unit="bits")
    with pytest.raises(SlimlmError, match="not rank"):
        allocate_from_metrics(metrics, "fisher", 0.5, unit="rank")


def test_fisher_bits_give_sensitive_blocks_more_bits():
    from slimlm.allocate import BIT_LEVELS, allocate_from_metrics, round_bits

    sizes = model_sizes(4)
    steepness = [10.0, 1.0, 0.3, 3.0]
    # rounding error falls ~4x per extra bit; a sensitive block's error costs more
    metrics = {f: {"size": sizes[f], "fisher_bits": {str(b): steepness[int(f.split(".")[2])] * sizes[f] * 4.0 ** -b
                                                     for b in BIT_LEVELS}} for f in sizes}
    budgets = allocate_from_metrics(metrics, "fisher", 3.5, unit="bits")
    block_bits = {block_of(f): b for f, b in budgets.items()}
    assert block_bits["model.layers.0"] > block_bits["model.layers.3"] > block_bits["model.layers.1"] > \
        block_bits["model.layers.2"]
    assert abs(weighted_mean(budgets, sizes) - 3.5) <= 3.5e-3
    assert weighted_mean(round_bits(budgets, sizes), sizes) <= 3.5 + 1e-9
