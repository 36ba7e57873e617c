"""Every allocation checked against its baseline on calibration windows the plan never saw, before it commits.

An allocator's costs are estimates (second-order Fisher terms, one layer at a time, an outlier ratio, a spectrum),
and estimates can be wrong on a model they were not built on: then a non-uniform plan loses to plain uniform
budgets, or a size mix to llama.cpp's fixed rule. So a run holds out its last calibration windows (never the
evaluation text), plans on the others, and measures on the held-out ones the model compressed by the baseline
(uniform budgets; for a GGUF size, llama.cpp's named mix that fits it), by the plan, and by plans on the way from
the one to the other (``path``). slimlm's own allocators keep the candidate that measures best; the baseline is
one of them, so the kept plan never measures worse than the baseline on those windows. OWL and AlphaPruning are
kept as their papers define them and report the same two figures.

Measure: the mean per-token KL(source ‖ compressed) of the next-token distributions on the held-out windows (the
statistic llama-perplexity's ``--kl-divergence`` reports). It compares with the source token by token, so it
ranks small damage with less noise than perplexity on a few windows.

Compression used for the measure: a one-shot stand-in for the run's method, cheap enough to measure five plans
(a full compression per candidate would multiply the run's time): Wanda masks (|W_ij|·‖X_j‖, per row; input norms
from the planning windows on the source model) for sparsity; round-to-nearest on the run's grid for bits; the
importance-weighted scale search onto each GGUF type (``gguf.types.fit``) for types. Error-correcting methods
(SparseGPT, GPTQ) lower every plan's damage; the check ranks the plans, its figures are not the run's result.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.allocate.allocators import round_bits
from slimlm.core.architectures import linear_fqns
from slimlm.core.engine import compress_blocks
from slimlm.errors import SlimlmError
from slimlm.pruning.masks import topk_mask
from slimlm.pruning.scores import wanda_scores
from slimlm.quant.rtn import rtn

log = logging.getLogger(__name__)

HOLDOUT_WINDOWS = 4  # default; at most half of the calibration windows are held out
HOLDOUT_TOKENS = 512  # tokens measured per held-out window: 4 x 512 measures a plan in seconds on a 135M model
STAND_IN_WINDOWS = 16  # planning windows whose input norms weigh the Wanda stand-in (the Fisher pass reads as many)
SELECTING = ("fisher", "errortable")  # slimlm's own allocators keep the check's best; OWL/AlphaPruning as published
PATH = (0.0, 0.25, 0.5, 0.75, 1.0)  # points from the baseline (0) to the plan (1) that slimlm's allocators measure


def split(calib: torch.Tensor, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(planning windows, held-out windows): the last ``min(holdout, n // 2)`` windows, cut to
    ``HOLDOUT_TOKENS``, are held out."""
    h = min(holdout, calib.shape[0] // 2)
    if h < 1:
        raise SlimlmError(f"the allocation check holds out calibration windows and {calib.shape[0]} window(s) leave "
                          "none to plan on: give --nsamples 2 or more, or --holdout 0 to skip the check")
    return calib[:-h], calib[-h:, :HOLDOUT_TOKENS]


def hold_out(model, calib: torch.Tensor, calib_info: dict, windows: int):
    """(planning windows, the source's ``Reference`` on the held-out ones) for the check; the calibration record
    says how many windows were held out. ``windows`` 0 (no check): (calib, None)."""
    if not windows:
        return calib, None
    calib, held = split(calib, windows)
    calib_info["held_out"] = held.shape[0]
    return calib, Reference(model, held)


class Reference:
    """The source model's next-token log-probabilities on the held-out windows, and the KLD of a changed model."""

    def __init__(self, model, windows: torch.Tensor):
        self.windows = windows
        self.logprobs = [self._logprobs(model, w) for w in windows.split(1)]

    @staticmethod
    @torch.no_grad()
    def _logprobs(model, window: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        return F.log_softmax(model(input_ids=window.to(device), use_cache=False).logits[0].float(), -1).cpu()

    def kld(self, model) -> float:
        """Mean over held-out tokens of KL(source ‖ model), in nats."""
        total, count = 0.0, 0
        for window, source in zip(self.windows.split(1), self.logprobs):
            changed = self._logprobs(model, window)
            total += (source.exp() * (source - changed)).sum(-1).double().sum().item()
            count += source.shape[0]
        return total / count


def measure(model, reference: Reference, candidates: dict[str, dict], stand_in: Callable[[str, torch.Tensor, object],
            torch.Tensor], progress: bool = True) -> dict[str, float]:
    """Held-out KLD of each candidate plan (name -> {fqn: budget}), the model's linears set to
    ``stand_in(fqn, source weight, budget)``; the source weights are restored after, also on error."""
    linears = linear_fqns(model)
    fqns = sorted(set().union(*candidates.values()))
    source = {f: linears[f].weight.data.clone() for f in fqns}
    applied: dict[str, object] = {}  # fqn -> the budget its weight holds now
    figures = {}
    try:
        for name, plan in tqdm(candidates.items(), desc="allocation check", disable=not progress):
            for fqn in fqns:
                if applied.get(fqn) != plan[fqn]:
                    linears[fqn].weight.data.copy_(stand_in(fqn, source[fqn], plan[fqn]))
                    applied[fqn] = plan[fqn]
            figures[name] = reference.kld(model)
    finally:
        for fqn in fqns:
            linears[fqn].weight.data.copy_(source[fqn])
    return figures


def choose(model, reference: Reference, baseline: dict, path: dict[str, dict], stand_in, select: bool,
           progress: bool = True) -> tuple[dict, dict]:
    """The plan to run and the manifest's record of the check. ``path``: label -> plan, ending with the
    allocator's own plan (label 'plan'); with ``select`` the lowest held-out KLD among the baseline and the path
    is kept (ties go to the baseline, then to the earlier point), otherwise the allocator's plan."""
    candidates = {"baseline": baseline, **path}
    return decide(reference, candidates, measure(model, reference, candidates, stand_in, progress), select)


def decide(reference: Reference, candidates: dict[str, object], figures: dict[str, float],
           select: bool) -> tuple[object, dict]:
    """``choose``'s decision and record from measured ``figures`` (candidate -> held-out KLD), for checks whose
    candidates are not weight stand-ins (widths change the shapes)."""
    kept = min(candidates, key=lambda k: figures[k]) if select else "plan"
    record = {"measure": "kld", "windows": reference.windows.shape[0], "tokens": reference.windows.numel(),
              "baseline": figures["baseline"], "plan": figures["plan"], "kept": kept,
              "path": {k: v for k, v in figures.items() if k not in ("baseline", "plan")}}
    if figures["plan"] > figures["baseline"]:
        log.warning("the allocation measures worse than the baseline on the held-out windows (KLD %.4g vs %.4g)%s",
                    figures["plan"], figures["baseline"], f"; kept {kept}" if select else "")
    return candidates[kept], record


def candidate_figures(check: dict) -> dict[str, float]:
    """Every measured candidate's held-out KLD in a check's record: label -> KLD."""
    return {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}


def summary(check: dict | None) -> dict:
    """What a command prints of the check: the held-out KLD of the baseline, the plan and the kept candidate, and
    which was kept (the CLI rounds what it prints)."""
    if not check or "kept" not in check:
        return {}
    figures = candidate_figures(check)
    return {"allocation_check": {"kept": check["kept"], "held_out_kld": {
        k: figures[k] for k in dict.fromkeys(("baseline", "plan", check["kept"]))}}}


def interpolated(baseline: dict[str, float], plan: dict[str, float], points=PATH) -> dict[str, dict[str, float]]:
    """Budgets on the straight line from ``baseline`` to ``plan`` (both at the same parameter-weighted mean, so every
    point is too); labelled 't=0.25' ..., the plan itself 'plan'."""
    return {("plan" if t == 1 else f"t={t:g}"): {f: (1 - t) * baseline[f] + t * plan[f] for f in plan}
            for t in points if t > 0}


def input_sqnorms(model, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each block linear's input channel norms ‖X_j‖₂² over ``windows`` (Wanda's statistic) on the source model,
    from one statistics pass of the block loop (``core.engine``) that changes no weight."""
    sqnorms = {}

    def record(group, stats):
        for fqn in group:
            sqnorms[fqn] = stats.sqnorm
        return False

    compress_blocks(model, windows, record, set(linear_fqns(model)), hessian=False, progress=False,
                    results=(sqnorms,))
    return sqnorms


def check_sparsity(model, budgets: dict[str, float], target: float, planning: torch.Tensor, reference: Reference,
                   select: bool, progress: bool = True) -> tuple[dict[str, float], dict]:
    """Per-layer sparsity checked against uniform ``target`` (Wanda masks stand in for the run's method)."""
    sqnorms = input_sqnorms(model, planning[:STAND_IN_WINDOWS])

    def stand_in(fqn, W, sparsity):
        return W * topk_mask(wanda_scores(W.float(), sqnorms[fqn]), sparsity, "row").to(W.dtype)
    baseline = {f: target for f in budgets}
    return choose(model, reference, baseline, interpolated(baseline, budgets, PATH if select else (1.0,)), stand_in,
                  select, progress)


def check_bits(model, continuous: dict[str, float], target: float, grid_for: Callable[[int], object],
               reference: Reference, select: bool, progress: bool = True) -> tuple[dict[str, int], dict]:
    """Per-layer bit-widths (rounded with ``round_bits``) checked against uniform ``target`` bits (rounded the same
    way: a fractional target mixes its two neighbours); round-to-nearest on each grid stands in for the method."""
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(model).items() if f in continuous}
    baseline = round_bits({f: target for f in continuous}, sizes)
    path = {k: round_bits(v, sizes) for k, v in
            interpolated({f: target for f in continuous}, continuous, PATH if select else (1.0,)).items()}
    return choose(model, reference, baseline, path, lambda fqn, W, bits: rtn(W, grid_for(bits)), select, progress)
