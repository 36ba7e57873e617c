"""Uniform integer grids: quantization parameters, codes, fake quantization of weights and activations.

Pure tensor functions. Weights are ``W`` (out, in); groups run along the input (last) dimension.
"""
import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.core.stats import ACCUM_DTYPE
from slimlm.errors import SlimlmError


CODE_DTYPE = torch.int16  # holds signed codes [-128, 127] and unsigned codes [0, 255] alike


@dataclass(frozen=True)
class QuantGrid:
    """A uniform integer grid: ``bits`` in 2..8, symmetric or asymmetric, per output channel or per group.

    Symmetric: codes in [-2^(b-1), 2^(b-1)-1], zero point 0. Asymmetric: codes in [0, 2^b-1] with an integer
    zero point. ``group_size`` None (or -1) = one group per output row; otherwise groups of ``group_size``
    consecutive input columns, the last one partial if it does not divide the width (576 / 128 -> 4x128 + 64).
    ``clip_ratio`` in (0, 1] shrinks the range before the scale is set (weight or activation clipping).
    ``scale_dtype`` "float16" rounds scales up to float16 values (``float16_scales``) so that GGUF's block types,
    which store scales in float16, hold the grid exactly; None keeps float32 scales.
    """

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0
    scale_dtype: str | None = None

    def __post_init__(self):
        bits = self.bits
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= 8:
            raise SlimlmError(f"bits must be an integer in 2..8, got {bits!r}")
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, numbers.Integral) or gs < 1):
            raise SlimlmError(f"group_size must be a positive integer, None or -1, got {gs!r}")
        if not 0 < self.clip_ratio <= 1:
            raise SlimlmError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.scale_dtype not in (None, "float16"):
            raise SlimlmError(f"scale_dtype must be None or 'float16', got {self.scale_dtype!r}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _groups(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(..., n) -> (..., ngroups, group_size), the last group zero-padded (harmless: every range contains 0)."""
    gs = group_size or x.shape[-1]
    return F.pad(x, (0, -x.shape[-1] % gs)).unflatten(-1, (-1, gs))


def _per_column(t: torch.Tensor, group_size: int | None, n: int) -> torch.Tensor:
    """Broadcast per-group parameters (..., ngroups) to the n columns they cover."""
    ngroups = 1 if group_size is None else math.ceil(n / group_size)
    if t.shape[-1] != ngroups:
        raise SlimlmError(f"expected {ngroups} groups for width {n}, got parameters of shape {tuple(t.shape)}")
    return t if group_size is None else t.repeat_interleave(group_size, -1)[..., :n]


def _codes(w, scale, zero, grid: QuantGrid) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, grid.qmin, grid.qmax)


def _values(codes, scale, zero) -> torch.Tensor:
    return (codes - zero) * scale


def grid_values_into(out: torch.Tensor, w, scale, zero, grid: QuantGrid) -> torch.Tensor:
    """``_values(_codes(w))`` written into ``out`` (same ops, same bits; the zero point is skipped on symmetric
    grids, where it is 0): the per-column step of the GPTQ and SparseGPT sweeps, without temporaries."""
    torch.div(w, scale, out=out).round_()
    if grid.symmetric:
        return out.clamp_(grid.qmin, grid.qmax).mul_(scale)
    return out.add_(zero).clamp_(grid.qmin, grid.qmax).sub_(zero).mul_(scale)


def quant_params(W: torch.Tensor, grid: QuantGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per (row, group): two fp32 tensors of shape (..., ngroups); zero holds integers.

    The range always contains 0 (as in GPTQ's reference quantizer and compressed-tensors) so the asymmetric zero
    point fits in [0, 2^b-1] and exact zeros (pruned weights) stay exactly zero.
    Symmetric: scale = max|w| / ((2^b - 1)/2), zero = 0, so max|w| / scale = 2^(b-1) - 1/2: all 2^b codes are
    used (-max|w| may round to -2^(b-1), +max|w| clamps to 2^(b-1) - 1 with error scale/2), which matters at
    2-3 bits. This is GPTQ's maxq convention shifted to signed codes and compressed-tensors' symmetric scale;
    the price is that fake_quant is not idempotent on symmetric grids (the re-derived scale differs).
    Asymmetric: scale = (max - min) / (2^b - 1), zero = round(-min / scale).
    Both: |fake_quant(w) - w| <= scale/2 for every unclipped w. All-zero groups get scale 1 (codes 0, no NaN).
    """
    g = _groups(W.to(ACCUM_DTYPE), grid.group_size)
    hi = g.amax(-1).clamp(min=0) * grid.clip_ratio
    lo = g.amin(-1).clamp(max=0) * grid.clip_ratio
    levels = grid.qmax - grid.qmin  # 2^b - 1 steps
    scale = torch.maximum(hi, -lo) / (levels / 2) if grid.symmetric else (hi - lo) / levels
    scale = torch.where(scale > torch.finfo(ACCUM_DTYPE).tiny, scale, torch.ones_like(scale))
    if grid.scale_dtype == "float16":
        scale = float16_scales(scale, grid)
    zero = torch.zeros_like(scale) if grid.symmetric else torch.round(-lo / scale)
    return scale, zero


def float16_scales(scale: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Scales rounded up to float16 values, at least float16's smallest normal 2^-14 (rounding up never narrows
    the range). GGUF stores a block's scale d in float16 (llama.cpp Q4_0/Q8_0: x = d·q) and Q4_1 also its offset
    m = -zero·d (x = d·q + m): asymmetric scales keep 11 - bits significant bits so that zero·d, with
    zero < 2^bits, still fits float16's 11."""
    bits = 11 if grid.symmetric else 11 - grid.bits
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ceil(mantissa * 2**bits) / 2**bits, exponent).clamp(min=2.0**-14)


def quantize(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Integer codes (CODE_DTYPE, shape of W): clamp(round(w / scale) + zero, qmin, qmax)."""
    n = W.shape[-1]
    s, z = _per_column(scale, grid.group_size, n), _per_column(zero, grid.group_size, n)
    return _codes(W.to(ACCUM_DTYPE), s, z, grid).to(CODE_DTYPE)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """fp32 values (codes - zero) * scale."""
    n = codes.shape[-1]
    s, z = _per_column(scale, grid.group_size, n), _per_column(zero, grid.group_size, n)
    return _values(codes.to(ACCUM_DTYPE), s, z)


def fake_quant(W: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """dequantize(quantize(W)) with parameters from W itself, returned in W's dtype."""
    scale, zero = quant_params(W, grid)
    return dequantize(quantize(W, scale, zero, grid), scale, zero, grid).to(W.dtype)


def column_quantizer(W: torch.Tensor, grid: QuantGrid):
    """``fn(column, j)`` that quantizes column j of W on the grid of its group, with parameters set once
    from W itself (static groups). SparseGPT's joint sparse+quantized sweep uses this: the reference code
    fixes its quantizer on the full W before the sweep, and static groups keep pruned zeros on the grid.
    """
    scale, zero = quant_params(W, grid)
    gs = grid.group_size or W.shape[1]

    def quantize_column(column: torch.Tensor, j: int) -> torch.Tensor:
        s, z = scale[:, j // gs], zero[:, j // gs]
        return grid_values_into(torch.empty_like(column), column, s, z, grid)
    return quantize_column


_straight_through = [False]


@contextlib.contextmanager
def straight_through():
    """Inside it, ``quantize_activations`` passes gradients straight through the rounding (x + (q − x).detach():
    the same values, up to float rounding), so that training through a quantized model sees its activations'
    quantizers (IntactKV's calibration)."""
    _straight_through[0] = True
    try:
        yield
    finally:
        _straight_through[0] = False


def quantize_activations(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = True, group_size: int | None = None
) -> torch.Tensor:
    """Simulated per-token dynamic quantization of activations or K/V (QuaRot §3: one scale per row of the last
    dim, computed on the fly). ``group_size`` splits the row into groups (e.g. per head for KV). Returns float."""
    q = fake_quant(x, QuantGrid(bits, symmetric, group_size, clip_ratio))
    return x + (q - x).detach() if _straight_through[0] else q
