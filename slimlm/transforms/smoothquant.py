"""SmoothQuant's per-channel smoothing: move activation outliers into the weights with one scale per channel.

Reference: Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models", ICML 2023, §4, Eq. 4: s_j = max|X_j|^α / max|W_j|^(1−α), then X -> X diag(s)⁻¹ and W -> W diag(s),
so X Wᵀ is unchanged while the activation's per-channel ranges are flattened (α = 0.5 balances the two sides;
larger α moves more difficulty into the weights). max|X_j| is the abs-max of channel j over the calibration
tokens; max|W_j| the abs-max of input column j over every linear that reads X (q/k/v together, gate/up
together). The scale is clamped at 1e-5 as in DuQuant's use of it (Lin et al., NeurIPS 2024, §3; its code's
smoothing step, Hsu1023/DuQuant quantize/duquant.py, CLIPMIN).

Where the scale goes: SmoothQuant folds diag(s)⁻¹ into the preceding LayerNorm/RMSNorm, which is free at
inference; so it smooths only the linears right after a norm (attention's q/k/v, the MLP's gate/up), as the
paper does. DuQuant smooths o_proj and down_proj too (``transforms.duquant``), online with its rotations.
"""
from __future__ import annotations

import torch

from slimlm.errors import SlimlmError

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s (n,) float32 from the input's per-channel abs-max and the (out, n) weights that read it."""
    if not 0 <= alpha <= 1:
        raise SlimlmError(f"smoothing alpha must be in [0, 1], got {alpha!r}")
    w_max = torch.cat([W.detach().abs().float() for W in weights]).amax(0)
    a_max = act_absmax.float()
    s = a_max.clamp(min=MIN_SCALE).pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)
