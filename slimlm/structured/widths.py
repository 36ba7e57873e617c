"""How many units (KV groups, MLP channels) each block loses, at a global target of decoder parameters kept.

Allocations:
  * ``uniform``: every block the same fraction (heads rounded to whole groups; the MLP takes up the rounding,
    so the total still meets the target).
  * ``owl``, ``alphapruning``: the per-linear budgets of those allocators (``slimlm.allocate``), averaged per
    block over attention (q, k, v, o) and over the MLP (gate, up, down), as fractions of units to remove.
  * ``flap``: FLAP's adaptive structure (AL-AM, An et al. 2024 §3.3): scores z-standardised within each block
    and kind, then one global ranking in which a unit weighs its parameter count (FLAP repeats a head 512/3
    times, LLaMA-7B's head-to-channel parameter ratio; here the costs are the model's own).
  * ``fisher``: slimlm's: one global ranking by estimated loss increase per parameter removed (the ``fisher``
    scores of ``width``, already in loss units, so no standardising).
Every block keeps at least one KV group and one MLP channel.
"""
from __future__ import annotations

import torch

from slimlm.errors import SlimlmError, unknown
from slimlm.structured.width import BlockUnits

ALLOCATIONS = ("uniform", "owl", "alphapruning", "flap", "fisher")


def total_params(units: list[BlockUnits]) -> int:
    return sum(len(u.head_scores) * u.head_cost + len(u.channel_scores) * u.channel_cost for u in units)


def check_keep(keep: float) -> None:
    if not 0 < keep < 1:
        raise SlimlmError(f"--params is the fraction of decoder parameters kept, in (0, 1); got {keep}")


def from_fractions(units: list[BlockUnits], fractions: list[tuple[float, float]], remove: float):
    """(groups, channels) removed per block from per-block (attention, MLP) fractions: head groups rounded,
    then the MLP fractions scaled together (bisection) so the parameters removed come to ``remove``."""
    heads = [min(len(u.head_scores) - 1, max(0, round(fa * len(u.head_scores)))) for u, (fa, _) in
             zip(units, fractions)]
    left = remove - sum(h * u.head_cost for h, u in zip(heads, units))

    def channels(scale):
        return [min(len(u.channel_scores) - 1, max(0, round(scale * fm * len(u.channel_scores))))
                for u, (_, fm) in zip(units, fractions)]

    lo, hi = 0.0, 1.0 / max(min(fm for _, fm in fractions), 1e-6)
    for _ in range(60):
        mid = (lo + hi) / 2
        removed = sum(c * u.channel_cost for c, u in zip(channels(mid), units))
        lo, hi = (mid, hi) if removed < left else (lo, mid)
    return list(zip(heads, channels(lo if left <= 0 else hi)))


def greedy(units: list[BlockUnits], keys: list[tuple[torch.Tensor, torch.Tensor]], remove: float):
    """(groups, channels) removed per block taking units in ascending ``keys`` order (per block: head keys,
    channel keys), skipping any that would overshoot ``remove`` by more than half the smallest unit (those further
    on fill the rest), so the parameters removed end within half an MLP channel of ``remove``."""
    entries = []
    for b, (u, (head_keys, channel_keys)) in enumerate(zip(units, keys)):
        entries += [(float(k), b, 0, u.head_cost) for k in head_keys]
        entries += [(float(k), b, 1, u.channel_cost) for k in channel_keys]
    entries.sort(key=lambda e: e[0])
    counts = [[0, 0] for _ in units]
    limits = [(len(u.head_scores) - 1, len(u.channel_scores) - 1) for u in units]
    removed, slack = 0, min(e[3] for e in entries) / 2
    for _, b, kind, cost in entries:
        if removed + cost > remove + slack:
            continue
        if counts[b][kind] < limits[b][kind]:
            counts[b][kind] += 1
            removed += cost
    return [tuple(c) for c in counts]


def _standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std().clamp_min(1e-12) if len(x) > 1 else torch.zeros_like(x)


def removal_counts(units: list[BlockUnits], allocation: str, keep: float,
                   fractions: list[tuple[float, float]] | None = None) -> list[tuple[int, int]]:
    """(KV groups, MLP channels) to remove per block so that about ``keep`` of the decoder parameters stay.
    ``fractions``: per-block (attention, MLP) fractions for ``owl``/``alphapruning`` (see the module docstring);
    for ``fisher`` the ``units`` must carry fisher scores."""
    check_keep(keep)
    remove = (1 - keep) * total_params(units)
    if allocation in ("uniform", "owl", "alphapruning"):
        counts = from_fractions(units, [(1 - keep, 1 - keep)] * len(units) if allocation == "uniform" else fractions,
                                remove)
    elif allocation == "flap":
        counts = greedy(units, [(_standardised(u.head_scores), _standardised(u.channel_scores)) for u in units],
                        remove)
    elif allocation == "fisher":
        counts = greedy(units, [(u.head_scores / u.head_cost, u.channel_scores / u.channel_cost) for u in units],
                        remove)
    else:
        raise unknown("width allocation", allocation, ALLOCATIONS)
    _check_reached(units, counts, remove, keep)
    return counts


def _check_reached(units: list[BlockUnits], counts, remove: float, keep: float) -> None:
    """A target that would take some layer below one head group or one MLP channel is an error, not a miss."""
    removed = sum(h * u.head_cost + c * u.channel_cost for (h, c), u in zip(counts, units))
    if remove - removed > max(max(u.head_cost, u.channel_cost) for u in units):
        least = sum(u.head_cost + u.channel_cost for u in units) / total_params(units)
        raise SlimlmError(f"--params {keep:g} is below what keeping at least one attention head group and one MLP "
                          f"channel per layer allows with this allocation (at least {least:.4f})")
