"""Integer codes read back from float weights that lie on a uniform grid.

slimlm's simulated quantization keeps weights in float, and its scales (set on pre-GPTQ weights) are not saved, so
recomputing them with ``quant_params`` on the saved weights would be wrong. Per (row, group) the scale is the
largest step s such that every value is an integer multiple of s inside the grid's code range, and the stored
scale must reproduce every weight bit for bit (``exact=False``: within SCALE_ULPS ulps, which bf16/fp16 runs
need); otherwise SlimlmError. The exact path is to record scale and zero point at quantize time and export
those; until ``quantize`` does, recovery plus verification is the safe substitute.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.formats.source import dtype_name
from slimlm.quant.grids import CODE_DTYPE, QuantGrid


MAX_CODE_TOLERANCE = 0.25  # |v/s - k| allowed while reading codes back; beyond it rounding is ambiguous
SCALE_ULPS = 2  # the exact scale is searched this many ulps either side of v/k


def _fits(k: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Whether each row of signed multiples k fits the grid: sym codes k in [qmin, qmax]; asym codes
    k + z in [0, 2^b - 1] for z = max(0, -min k)."""
    lo, hi = k.amin(-1), k.amax(-1)
    if grid.symmetric:
        return (lo >= grid.qmin) & (hi <= grid.qmax)
    return hi + (-lo).clamp(min=0) <= grid.qmax


def _best_scale(v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the scale s in v's dtype near v/k that makes fl(k·s) closest to v (how compressed-tensors
    dequantizes: codes cast to the scale's dtype, times the scale), and that largest error max|fl(k·s) - v|
    relative to max|v| (0 where s reproduces v exactly).

    Most rows are reproduced exactly by the first candidate s0 = v/k at the largest |k|, and no other candidate
    can beat an error of 0, so only the other rows search the ulps around s0 (``_search_ulps``)."""
    ref = k.abs().argmax(-1, keepdim=True)  # the largest multiple pins s down best
    s0 = (v.gather(-1, ref).double() / k.gather(-1, ref)).to(v.dtype).squeeze(-1)
    kd = k.to(v.dtype)
    best, err = s0.clone(), torch.zeros(s0.shape, dtype=torch.float64)
    rest = (kd * s0.unsqueeze(-1) != v).any(-1).nonzero().squeeze(-1)
    if rest.numel():
        v_rest = v[rest].double()
        best[rest], err[rest] = _search_ulps(v_rest, kd[rest], s0[rest])
        err[rest] /= v_rest.abs().amax(-1)
    return best, err


def _search_ulps(v64: torch.Tensor, kd: torch.Tensor, s0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the scale among s0 and the SCALE_ULPS values either side of it with the smallest
    max|fl(k·s) - v| (the first one on ties, s0 first), and that error."""
    best, err = s0, torch.full(s0.shape, math.inf, dtype=torch.float64)
    up, down = s0, s0
    for step in range(SCALE_ULPS + 1):
        for s in (up, down) if step else (s0,):
            e = ((kd * s.unsqueeze(-1)).double() - v64).abs().amax(-1)
            better = e < err
            best, err = torch.where(better, s, best), torch.where(better, e, err)
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.zeros_like(down))
    return best, err


def recover_grid(W: torch.Tensor, grid: QuantGrid, name: str = "weight", exact: bool = True):
    """Integer codes, scale and zero point of a weight that lies on ``grid``, read back from its values.

    Returns ``codes`` (CODE_DTYPE, shape of W; signed for symmetric grids, [0, 2^b-1] otherwise), ``scale``
    (W's dtype, (out, ngroups)), ``zero`` (int64, (out, ngroups); zeros when symmetric) and the largest
    relative error of ``(codes - zero).to(W.dtype) * scale`` against W (0.0: bit for bit).

    Per (row, group) with d = min |w| over nonzero w: for j = 1, 2, ... the first step s = d/j (d is j·s)
    with every w/s an integer (within the dtype's rounding), inside the code range, and with a scale in W's
    dtype reproducing the group: the largest valid step. Small codes are common, so j stays small.
    Any such representation decompresses to the same weights; it need not be the one quantization used.

    ``exact=False`` accepts a group reproduced within SCALE_ULPS ulps instead of bit for bit. Half-precision
    runs need it: slimlm's scales are fp32, the weights fp32 grid values rounded once to bf16/fp16, and a
    bf16/fp16 scale (as compressed-tensors stores it) usually cannot reproduce that rounding for every code.
    SlimlmError if a group has no representation (the weights are not on a ``grid.bits`` uniform grid).
    """
    out, n = W.shape
    gs = grid.group_size or n
    ngroups = math.ceil(n / gs)
    V = F.pad(W, (0, ngroups * gs - n)).reshape(out * ngroups, gs)  # one row per (row, group)
    # smallest nonzero magnitude per group, inf if none (taken in W's dtype: abs and min are exact)
    d = V.abs().masked_fill(V == 0, math.inf).amin(-1).double()
    kmax = max(-grid.qmin, grid.qmax)
    eps = torch.finfo(W.dtype).eps
    tol = 2 * kmax * eps
    if tol > MAX_CODE_TOLERANCE:
        raise SlimlmError(f"{grid.bits}-bit codes cannot be read back reliably from {dtype_name(W.dtype)} "
                          "weights; export from a float32 run (or record scales at quantize time)")
    K = torch.zeros(V.shape, dtype=torch.int64)
    scale = torch.ones(V.shape[0], dtype=W.dtype)  # all-zero groups: scale 1, codes 0 (as quant_params)
    error = torch.zeros(V.shape[0], dtype=torch.float64)
    done, on_grid = torch.isinf(d), torch.isinf(d)
    for j in range(1, kmax + 1):
        todo = (~done).nonzero().squeeze(-1)
        if not todo.numel():
            break
        v = V[todo]
        r = v.double() / (d[todo] / j).unsqueeze(-1)
        k = r.round()
        fits = ((r - k).abs() <= tol).all(-1) & _fits(k, grid)
        on_grid[todo[fits]] = True
        todo, v, k = todo[fits], v[fits], k[fits]  # only groups on the grid need a scale
        s, e = _best_scale(v, k)
        ok = e == 0 if exact else e <= SCALE_ULPS * eps
        hit = todo[ok]
        K[hit], scale[hit], error[hit], done[hit] = k[ok].long(), s[ok], e[ok], True
    if not done.all():
        first = int((~done).nonzero()[0])
        where = (f"{int((~done).sum())} of {done.numel()} groups, first row {first // ngroups} "
                 f"group {first % ngroups}")
        if on_grid[~done].all():
            raise SlimlmError(f"{name} is on a {grid.bits}-bit grid only up to {dtype_name(W.dtype)} rounding "
                              f"({where}); pass exact=False to store the nearest {dtype_name(W.dtype)} scales")
        raise SlimlmError(f"{name} is not on a {grid.bits}-bit uniform grid ({where}); was the run edited or "
                          "fine-tuned after quantization?")
    K, scale, error = K.reshape(out, ngroups, gs), scale.reshape(out, ngroups), error.reshape(out, ngroups)
    zero = torch.zeros_like(scale, dtype=torch.int64) if grid.symmetric else (-K.amin(-1)).clamp(min=0)
    codes = (K + zero.unsqueeze(-1)).reshape(out, -1)[:, :n]
    return codes.to(CODE_DTYPE), scale, zero, error.max().item()
