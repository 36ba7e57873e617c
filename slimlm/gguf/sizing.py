"""Per-tensor GGUF types fitted to a size: our own mixes, where llama.cpp's named mixes use a fixed rule.

Choices are llama.cpp's types that hold a tensor's rows (K-types and IQ4_XS for rows of multiples of 256, the
legacy types and IQ4_NL for multiples of 32). Cost of a (tensor, type): the loss increase the empirical Fisher
predicts for that tensor rounded onto that type, ½·Σ F_ij (W_ij − Q_ij)² (F from
``analysis.sensitivity.fisher_diagonal``: squared per-window gradients of the model's own loss, so it carries how
later blocks amplify the error; Q from ``gguf.types.fit`` weighted by the imatrix). The sum of costs is minimised under the byte budget as a
multiple-choice knapsack: a Lagrange multiplier λ (each tensor takes its argmin of cost + λ·bytes), bisected to
the largest choice that fits, then a greedy pass that spends what is left on the best cost drop per byte.
Tensors outside the decoder blocks (embedding, output, norms) keep llama.cpp's default types and count in the size.

The Fisher costs are estimates; before a run commits, ``departures`` gives the plans between llama.cpp's own rule
for the size (``rule_for_size``) and the cost-optimal mix, and ``allocate.holdout`` keeps the one that measures
best on held-out windows, so the mix departs from the rule only where measured evidence pays.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError
from slimlm.gguf.types import TYPES, fit

K_CHOICES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LEGACY_CHOICES = ("IQ4_NL", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


@dataclass(frozen=True)
class Size:
    """A size target: bits per weight over all tensors, or tensor bytes."""

    bpw: float | None = None
    nbytes: int | None = None

    def budget(self, params: int) -> int:
        return int(self.nbytes if self.nbytes is not None else self.bpw * params / 8)


def parse_size(text: str) -> Size:
    """'3.5bpw' (bits per weight over every tensor, as llama-quantize reports), or bytes of tensor data:
    '70000000', '70MB', '66.8MiB'."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(bpw|b|kb|mb|gb|kib|mib|gib)?\s*", str(text).lower())
    if match is None:
        raise SlimlmError(f"--size '{text}': give bits per weight (3.5bpw) or bytes (70MB, 66.8MiB, 70000000)")
    value, unit = float(match.group(1)), match.group(2) or "b"
    if unit == "bpw":
        if not 1 < value <= 16:
            raise SlimlmError(f"--size {text}: bits per weight must be in (1, 16]")
        return Size(bpw=value)
    scale = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}[unit]
    return Size(nbytes=int(value * scale))


def choices(width: int) -> tuple[str, ...]:
    if width % 256 == 0:
        return K_CHOICES
    if width % 32 == 0:
        return LEGACY_CHOICES
    return ()


def tensor_bytes(kind: str, shape: tuple[int, ...]) -> int:
    if kind in TYPES:
        return shape[0] * shape[1] // TYPES[kind].block * TYPES[kind].nbytes
    return math.prod(shape) * {"F16": 2, "F32": 4}[kind]


def cost_table(weights: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
               importance: dict[str, torch.Tensor], progress: bool = True) -> dict[str, dict[str, float]]:
    """name -> {type: ½·Σ F ⊙ (W − Q_type)²} for every weight in ``fisher``."""
    table = {}
    for name in tqdm(fisher, desc="type costs", disable=not progress):
        W = weights[name].detach().float()
        table[name] = {kind: 0.5 * float((fisher[name] * (fit(TYPES[kind], W, importance[name]).values() - W)
                                          .square()).sum()) for kind in choices(W.shape[1])}
    return table


def check_size_fits(size: str, shapes: dict[str, tuple[int, ...]], types: dict[str, str], sized: list[str],
                    gguf_name) -> None:
    """Refuse a ``size`` the model cannot reach, from its tensor shapes alone: the tensors the size mix does not
    choose (embedding, output, norms: the mix's ``types``) plus the ``sized`` matrices in their smallest types. The
    error names the smallest ``--size`` that fits."""
    target = parse_size(size)
    params = sum(math.prod(shape) for shape in shapes.values())
    smallest = {n: min(tensor_bytes(k, shapes[n]) for k in choices(shapes[n][1])) for n in sized
                if choices(shapes[n][1])}
    fixed = sum(tensor_bytes(types[gguf_name(n)], shape) for n, shape in shapes.items() if n not in smallest)
    need = fixed + sum(smallest.values())
    if target.budget(params) < need:
        fits = f"{math.ceil(800 * need / params) / 100:g}bpw" if target.bpw is not None else f"{need}"
        raise SlimlmError(f"--size {size} is too small for this model: its embedding, output and norms take "
                          f"{_megabytes(fixed)} in the mix's types and its block matrices at least "
                          f"{_megabytes(sum(smallest.values()))} in their smallest types; the smallest size that "
                          f"fits is --size {fits}")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def solve(costs: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], budget: int) -> dict[str, str]:
    """Types minimising the summed cost with Σ bytes ≤ budget (SlimlmError when even the smallest choices do
    not fit)."""
    smallest = sum(min(nbytes[n].values()) for n in costs)
    if smallest > budget:
        raise SlimlmError(f"the size asked leaves {budget:,} bytes for the block tensors; their smallest types "
                          f"need {smallest:,}")

    def pick(lam: float) -> dict[str, str]:
        return {n: min(costs[n], key=lambda k: (costs[n][k] + lam * nbytes[n][k], nbytes[n][k])) for n in costs}

    def used(choice):
        return sum(nbytes[n][k] for n, k in choice.items())
    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= budget else (mid, hi)
    choice = pick(hi)
    left = budget - used(choice)
    while True:  # greedy: the upgrade with the largest cost drop per extra byte that still fits
        best, best_rate = None, 0.0
        for n, k in choice.items():
            for k2 in costs[n]:
                extra = nbytes[n][k2] - nbytes[n][k]
                drop = costs[n][k] - costs[n][k2]
                if 0 < extra <= left and drop > 0 and drop / extra > best_rate:
                    best, best_rate = (n, k2, extra), drop / extra
        if best is None:
            return choice
        choice[best[0]], left = best[1], left - best[2]


RULE_MIXES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
              "Q5_K_M", "Q6_K", "Q8_0")  # llama.cpp's named quantized file types


def rule_for_size(types_of, nbytes: dict[str, dict[str, int]], budget: int) -> tuple[str, dict[str, str]] | None:
    """(mix, its types for the sized tensors) of the llama.cpp named mix with the most bytes that fit ``budget``
    (``types_of(mix)``: tensor -> type for every sized tensor), or None when even the smallest does not fit or a
    mix's type is not among a tensor's choices."""
    fitting = []
    for mix in RULE_MIXES:
        types = types_of(mix)
        if all(types[n] in nbytes[n] for n in nbytes):
            used = sum(nbytes[n][types[n]] for n in nbytes)
            if used <= budget:
                fitting.append((used, mix, types))
    return max(fitting)[1:] if fitting else None


DEPARTURE_PENALTIES = (0.5, 0.2, 0.05)  # fractions of a tensor's cost at the rule's type that a change must beat
REFINE_ROUNDS = 2  # greedy rounds of ``refine``: each measures one candidate per tensor kind


def kind_of(name: str) -> str:
    """A tensor's kind: its name without the block (and expert) numbers, e.g. model.layers.mlp.down_proj.weight."""
    return re.sub(r"\.\d+\.", ".", name)


def departing(costs: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], budget: int,
              rule: dict[str, str], free: frozenset[str], mu: float) -> dict[str, str]:
    """``solve`` where only tensors of the kinds in ``free`` may leave the rule's type, and each change is charged
    ``mu`` times that tensor's cost at the rule's type."""
    charged = {n: {k: c + (0.0 if k == rule[n] else mu * costs[n][rule[n]]) for k, c in table.items()
                   if kind_of(n) in free or k == rule[n]} for n, table in costs.items()}
    return solve(charged, nbytes, budget)


def departures(costs: dict[str, dict[str, float]], nbytes: dict[str, dict[str, int]], budget: int,
               rule: dict[str, str]) -> dict[str, dict[str, str]]:
    """Plans from the rule's types to the cost-optimal mix: every change of a tensor's type charged μ times that
    tensor's cost at the rule's type, for μ in ``DEPARTURE_PENALTIES`` (labelled 'mu=0.5', ...), then μ = 0, the
    optimal mix itself (labelled 'plan'). A large μ keeps the rule except where the estimated gain is large; the
    held-out check decides how far to trust the estimates."""
    every = frozenset(kind_of(n) for n in costs)
    return {(f"mu={mu:g}" if mu else "plan"): departing(costs, nbytes, budget, rule, every, mu)
            for mu in (*DEPARTURE_PENALTIES, 0.0)}


def refine(costs, nbytes, budget: int, rule: dict[str, str], kept: str, kept_figure: float,
           measure) -> tuple[dict[str, str], list[dict]]:
    """Greedy moves from the check's kept candidate, each a whole tensor kind: one that departs is held to the
    rule's types, or (from the rule) one kind is let depart at μ = 0. Each round measures every such move
    (``measure``: label -> plan in, label -> held-out KLD out) and takes the best if it lowers the figure; at most
    ``REFINE_ROUNDS`` rounds. Returns (plan, the moves taken with their figures). The costs said where to depart,
    the measure says which kinds to trust them on (the held-out model's failure was one kind, ffn_down, pushed to
    Q2_K); a move is taken only on measured evidence, so the result never measures worse than ``kept``."""
    every = frozenset(kind_of(n) for n in costs)
    free, mu = (frozenset(), 0.0) if kept == "baseline" else (every, float(kept.removeprefix("mu=")) if
                                                                kept.startswith("mu=") else 0.0)
    plan, best, steps = departing(costs, nbytes, budget, rule, free, mu), kept_figure, []
    for _ in range(REFINE_ROUNDS):
        moves = {f"{'hold' if k in free else 'free'} {k.removesuffix('.weight')}": free ^ {k} for k in sorted(every)}
        plans = {label: departing(costs, nbytes, budget, rule, kinds, mu) for label, kinds in moves.items()}
        figures = measure(plans)
        label = min(figures, key=lambda k: figures[k])
        if figures[label] >= best:
            break
        free, best, plan = moves[label], figures[label], plans[label]
        steps.append({"move": label, "kld": best})
    return plan, steps
