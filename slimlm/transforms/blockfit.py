"""Fitting a quantized block to the full-precision block's outputs: the training loop of FlatQuant, DuQuant's
learnable weight clipping (LWC, from OmniQuant) and their straight-through quantizers.

It lives beside its users, the transforms that train per block (``flatquant``, ``duquant`` with LWC): what it fits
are transformed, clipped, fake-quantized weights, which only those methods have. It is no quantizer of
``slimlm.quant`` (those round a fixed weight), and IntactKV's calibration (``hooks.intactkv``) tunes a cache, not a
block's weights, with its own loop.

Rounding has zero gradient almost everywhere; ``ste_fake_quant`` passes the gradient straight through the
rounding (OmniQuant §3.2, FlatQuant §3.3) while keeping it through the scale, so clipping ratios learn.
``fit_block_`` runs the block under ``torch.func.functional_call`` with parameters rebuilt at every step from the
trainable ones (transformed, clipped, fake-quantized weights), so the block module itself is never modified until
its caller fixes the result.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call


def _round_ste(z: torch.Tensor) -> torch.Tensor:
    return z + (torch.round(z) - z).detach()


def ste_fake_quant(x: torch.Tensor, bits: int, symmetric: bool, hi_ratio, lo_ratio) -> torch.Tensor:
    """Per-row (last dim) fake quantization with ``grids.quant_params``' formulas, the range scaled by the clip
    ratios (tensors broadcastable to (..., 1)), differentiable in x and in the ratios (straight-through round)."""
    hi = x.amax(-1, keepdim=True).clamp(min=0) * hi_ratio
    lo = x.amin(-1, keepdim=True).clamp(max=0) * lo_ratio
    levels = 2 ** bits - 1
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (levels / 2)).clamp(min=1e-8)
        return torch.clamp(_round_ste(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = _round_ste(-lo / scale)
    return (torch.clamp(_round_ste(x / scale) + zero, 0, levels) - zero) * scale


def fake_quant_weight(W: torch.Tensor, grid, hi_ratio, lo_ratio) -> torch.Tensor:
    """``ste_fake_quant`` of W (out, in) on ``grid`` (per row, or per group of columns, the last group partial
    where the group size does not divide the width, as ``quant.grids`` has it: 576 = 4x128 + 64), each row's range
    scaled by its LWC ratios (out, 1)."""
    if grid.group_size is None:
        return ste_fake_quant(W, grid.bits, grid.symmetric, hi_ratio, lo_ratio)
    g = grid.group_size
    full = W.shape[-1] // g * g
    parts = [] if full == 0 else [ste_fake_quant(W[:, :full].unflatten(-1, (-1, g)), grid.bits, grid.symmetric,
                                                 hi_ratio[:, None], lo_ratio[:, None]).flatten(-2)]
    if full < W.shape[-1]:
        parts.append(ste_fake_quant(W[:, full:], grid.bits, grid.symmetric, hi_ratio, lo_ratio))
    return torch.cat(parts, -1)


@torch.no_grad()
def clamp_rows(W: torch.Tensor, hi_ratio, lo_ratio) -> torch.Tensor:
    """W clamped to its learned per-row range [lo·min, hi·max]: learned clipping baked into the weight, so RTN or
    GPTQ on an unclipped grid then sees the trained range."""
    return torch.clamp(W, W.amin(1, keepdim=True).clamp(max=0) * lo_ratio,
                       W.amax(1, keepdim=True).clamp(min=0) * hi_ratio)


def _forward(block, params, x, call_args):
    args, kwargs = call_args
    out = functional_call(block, params, (x, *args), kwargs)
    return out[0] if isinstance(out, tuple) else out


def fit_block_(block: nn.Module, params_fn, param_groups: list[dict], inputs: torch.Tensor, targets: torch.Tensor,
               call_args: dict, epochs: int, batch: int, weight_decay: float, normalized: bool,
               eta_min_ratio: float | None = 1e-3) -> tuple[float, float]:
    """Train ``param_groups`` (AdamW) so that ``block`` with parameters ``params_fn()`` maps ``inputs`` to
    ``targets`` in mean squared error, windows in order, ``batch`` at a time; cosine schedule down to
    lr·``eta_min_ratio`` over all steps (None: constant lr). ``normalized`` divides each loss by its detached
    value (FlatQuant's reference code: the gradient of log MSE). ``call_args``: the block's call arguments by
    batch size (the engine's capture; masks and rotary tables broadcast over the batch). Returns the mean loss of
    the first and of the last epoch."""
    n = inputs.shape[0]
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    steps = epochs * math.ceil(n / batch)
    schedule = None if eta_min_ratio is None else torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, steps, eta_min=param_groups[0]["lr"] * eta_min_ratio)
    block.requires_grad_(False)
    epoch_losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for s in range(0, n, batch):
                e = min(s + batch, n)
                args = call_args.get(e - s) or next(iter(call_args.values()))
                loss = (_forward(block, params_fn(), inputs[s:e], args) - targets[s:e]).square().mean()
                optimizer.zero_grad()
                (loss / loss.detach() if normalized else loss).backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total += loss.item() * (e - s)
            epoch_losses.append(total / n)
    return epoch_losses[0], epoch_losses[-1]
