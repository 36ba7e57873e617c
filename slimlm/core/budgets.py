"""Per-layer budget maps are plain data, FQN -> budget: set from a default, a given map and regex overrides, and
summed up by parameter count. The allocators (``slimlm.allocate``) produce such maps; the stages that apply them
(``pruning``, ``quantize``) and the allocators share these helpers.
"""
from __future__ import annotations

import re

from slimlm.errors import SlimlmError


def apply_overrides(budgets: dict, overrides: dict | None) -> dict:
    """``budgets`` with every layer whose FQN matches a regex of ``overrides`` (``re.search``) set to its value;
    the first matching regex, in the order given, wins. A regex that matches no layer is an error: it is a typo
    or meant for another model, and ignoring it would give a run that contradicts its recipe."""
    overrides = overrides or {}
    unused = [r for r in overrides if not any(re.search(r, fqn) for fqn in budgets)]
    if unused:
        raise SlimlmError(f"override '{unused[0]}' matches no layer (names look like {next(iter(budgets), '-')})")
    out = dict(budgets)
    for fqn in budgets:
        first = next((r for r in overrides if re.search(r, fqn)), None)
        if first is not None:
            out[fqn] = overrides[first]
    return out


def layer_budgets(layers, default: float, budgets: dict | None, overrides: dict | None) -> dict:
    """Each of ``layers`` (FQNs) -> its budget: ``budgets``' value, else ``default``; then ``overrides``."""
    strangers = set(budgets or {}) - set(layers)
    if strangers:
        raise SlimlmError(f"budgets name layers the model does not have: {sorted(strangers)[:3]}")
    return apply_overrides({fqn: default for fqn in layers} | (budgets or {}), overrides)


def size_weighted_mean(budgets: dict[str, float], sizes: dict[str, int]) -> float:
    """Σ nᵢ bᵢ / Σ nᵢ over the layers of ``budgets``: the global budget a per-layer map amounts to."""
    return sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes[n] for n in budgets)
