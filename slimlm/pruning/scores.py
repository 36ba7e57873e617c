"""Score-based pruning: magnitude, Wanda and RIA. Each scores every weight, then ``masks.score_mask`` keeps the
highest scores of each comparison group, each paper's own: magnitude per matrix and Wanda per output row (Sun et
al., "A Simple and Effective Pruning Approach for Large Language Models", ICLR 2024, §3, "comparison group"), RIA
per matrix (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models",
ICLR 2024; its reference code's default, lib/prune.py).
"""
from __future__ import annotations

import torch

from slimlm.core.stats import ACCUM_DTYPE, LayerStats
from slimlm.pruning.masks import score_mask
from slimlm.pruning.spec import PruneSpec
from slimlm.quant.rtn import rtn


def wanda_scores(W: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """Wanda importance S_ij = |W_ij|·‖X_j‖₂ (Wanda Eq. 1), in float32.

    W: (out, in); sqnorm: (in,) per-input-channel squared L2 norm of the calibration inputs (any consistent
    normalisation: the Wanda reference uses the mean over tokens; OWL's ratio is invariant to the scale).
    """
    return W.float().abs() * sqnorm.float().sqrt()[None, :]


def magnitude_scores(W: torch.Tensor, stats: LayerStats | None, spec: PruneSpec) -> torch.Tensor:
    return W.abs()


def wanda(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> torch.Tensor:
    """Wanda (Sun et al. 2023, Eq. 1): S_ij = |W_ij| · ‖X_j‖₂."""
    return wanda_scores(W, stats.sqnorm)


def ria_scores(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> torch.Tensor:
    """RIA (Zhang et al. 2024, Eq. 3): (|W_ij|/Σ_i|W_ij| + |W_ij|/Σ_j|W_ij|) · (‖X_j‖₂)^a.

    Relative importance divides by the weight's column sum (its input channel) and row sum (its
    output channel); a = 0.5 is the paper's default.
    """
    A = W.abs()
    tiny = torch.finfo(A.dtype).tiny
    relative = A / A.sum(0, keepdim=True).clamp_min(tiny) + A / A.sum(1, keepdim=True).clamp_min(tiny)
    return relative * stats.sqnorm.sqrt().pow(spec.ria_alpha).unsqueeze(0)


def score_method(score_fn, default_group: str):
    def prune_fn(W, stats, sparsity, spec):
        Wf = W.to(ACCUM_DTYPE)
        mask, perm = score_mask(score_fn(Wf, stats, spec), sparsity, spec, default_group)
        new = Wf * mask if spec.grid is None else rtn(Wf * mask, spec.grid) * mask
        return new.to(W.dtype), mask, perm
    prune_fn.__doc__ = score_fn.__doc__
    return prune_fn
