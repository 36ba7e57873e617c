"""Activation statistics of every block linear from one dense calibration pass, and OWL's outlier ratios.

References:
- Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024: layer-wise outlier distribution (LOD).
- Sun et al., "A Simple and Effective Pruning Approach for Large Language Models (Wanda)", ICLR 2024, Eq. 1.
"""
from __future__ import annotations

from typing import Sequence

import torch

from slimlm.analysis.sensitivity import ERROR_LEVELS, pruning_error_table
from slimlm.core.architectures import block_of, linear_fqns
from slimlm.core.engine import compress_blocks
from slimlm.core.linalg import small_op_threads
from slimlm.core.timing import timed
from slimlm.pruning.scores import wanda_scores


OWL_M = 5.0  # OWL outlier threshold M: the OWL README's 70% recipe uses 5 (its main.py default --Hyper_m is 3)


def owl_outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], m: float = OWL_M) -> float:
    """OWL's layer-wise outlier distribution: the fraction of scores strictly above m × their mean.

    ``scores`` is one tensor of Wanda scores or a sequence of them (OWL concatenates all linears of a block, so the
    mean is over all their entries together). Returned as a fraction in [0, 1]; the OWL code reports 100× this,
    which its min-max normalisation cancels. Mean and count are accumulated in float64 / int64 to stay exact on
    the ~10⁸ entries of a 7B block.
    """
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    total = sum(p.sum(dtype=torch.float64) for p in parts)
    count = sum(p.numel() for p in parts)
    threshold = (m * total / count).item()
    # compare in at least float32: a bf16/fp16 copy of the threshold would move it by up to 0.4%
    above = sum((p.to(torch.promote_types(p.dtype, torch.float32)) > threshold).sum().item() for p in parts)
    return above / count


def calibration_metrics(model, windows: torch.Tensor, owl_m: float = OWL_M, error_levels=ERROR_LEVELS,
                        device="cpu", batch_size: int | None = None, progress: bool = True,
                        timings: dict[str, float] | None = None) -> dict[str, dict]:
    """Activation metrics of every block linear from one dense pass of the engine (weights unchanged).

    Per linear: the mean and max input-channel norm ‖X_j‖₂ (per token, i.e. sqrt of the mean square), the
    max/median channel-norm ratio, OWL's outlier ratio of the linear alone (``outlier_ratio``) and of its
    whole block (``owl_lod``, the quantity OWL allocates by), and, when ``error_levels`` is given, the
    relative output error table of ``pruning_error_table``. ``timings`` (if given) gets the seconds of the
    parts: ``calibration_pass`` (the engine's capture and block forwards), ``error_tables``, and ``owl`` (input
    norms and outlier ratios).
    """
    linears = linear_fqns(model)
    records, sqnorms, parts = {}, {}, {}

    def record(group, stats):
        with timed(parts, "owl"), small_op_threads(max(lin.weight.numel() for lin in group.values())):
            rms = (stats.sqnorm / stats.ntokens).sqrt()  # the input's norms: one computation for the whole group
            input_norms = {"input_norm_mean": rms.mean().item(), "input_norm_max": rms.max().item(),
                           "input_norm_max_over_median": (rms.max() / rms.median().clamp_min(1e-30)).item()}
            for fqn, linear in group.items():
                sqnorms[fqn] = stats.sqnorm
                records[fqn] = {**input_norms, "outlier_ratio": owl_outlier_ratio(
                    wanda_scores(linear.weight, stats.sqnorm), owl_m)}
        if error_levels:
            with timed(parts, "error_tables"):
                for fqn, linear in group.items():
                    records[fqn]["errors"] = pruning_error_table(linear.weight, stats.sqnorm, stats.hessian,
                                                                 error_levels)
        return False

    engine = compress_blocks(model, windows, record, set(linears), hessian=bool(error_levels), device=device,
                             batch_size=batch_size, progress=progress, results=(records, sqnorms))
    with timed(parts, "owl"), small_op_threads(max(lin.weight.numel() for lin in linears.values())):
        blocks: dict[str, list[str]] = {}
        for fqn in linears:
            blocks.setdefault(block_of(fqn), []).append(fqn)
        for names in blocks.values():  # OWL: one ratio over the concatenated scores of the block's linears
            lod = owl_outlier_ratio([wanda_scores(linears[f].weight, sqnorms[f]) for f in names], owl_m)
            for f in names:
                records[f]["owl_lod"] = lod
    if timings is not None:
        timings |= {"calibration_pass": engine.timings["capture"] + engine.timings["forward"], **parts}
    return records
