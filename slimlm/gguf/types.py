"""llama.cpp's weight types as quantization grids, and the scale search that fits a weight onto them.

Layouts (ggml's src/ggml-common.h block structs, QK_K = 256). Every type splits a row into blocks of ``block``
weights along the input dimension and each block into sub-blocks of ``sub`` weights that share one step:

- legacy (block = sub = 32): Q4_0/Q5_0/Q8_0 x = d·(q - offset); Q4_1/Q5_1 x = d·q + m; d, m float16.
- K-types (block 256): x = d·sc·(q - offset) (Q3_K, Q6_K: signed sub-block scales sc) or x = d·sc·q - dmin·mn
  (Q2_K, Q4_K, Q5_K: unsigned sub-block scales sc and mins mn of ``scale_bits`` bits); d, dmin float16.
- non-linear 4-bit (ggml-common.h block_iq4_nl, block_iq4_xs): x = d·v[q] with a 16-entry codebook v
  (``IQ4_LEVELS``, denser near 0, where weights are); IQ4_NL one float16 d per 32 weights (any row of 32s),
  IQ4_XS a super-block of 256 with 6-bit signed sub-block scales: x = d·sc·v[q], sc in [-32, 31].

A fitted tensor (``Fitted``) holds the stored integers. Its values are computed as ggml's dequantize_row_* computes
them, in float32: step a = d·sc and offset b = dmin·mn are exact products (11-bit d times an integer of at most
8 bits), a·k is exact too, so the only rounding is the final add, and a fused multiply-add gives the same bits.

Scale search (ggml's src/ggml-quants.c, quantize_row_*_impl): per sub-block, a weighted least-squares scale over a
handful of candidate inverse scales (symmetric types: ``make_qx_quants``' 19 candidates around nmax / max, signed so
that the largest weight takes the wider negative end; types with a min: ``make_qkx3_quants``' 37 candidates with the
2×2 weighted least-squares (scale, min) solve, min ≤ 0). K-types then quantize the sub-block scales (and mins) to
their bits under one float16 super-block scale chosen among a few candidates by the weighted error of the final
rounding (the role of ``make_qp_quants``). The non-linear types search their sub-block scale the same way over the codebook (``_codebook_search``: the scale
whose largest weight lands on the codebook's positive end, then 15 scales whose largest weight lands around its
negative end, each with its least-squares refit; llama.cpp's quantize_row_iq4_nl_impl with ntry 7). Element weights
follow llama-quantize: with importance weights (imatrix:
mean x_j² of input j over calibration tokens) w = imp_j·√(σ² + x²), σ² = 2·mean(x²) of the block's row slice;
without, the per-type defaults of its reference path (|x| + rms of the sub-block for Q4_K/Q5_K and the legacy types,
x² for Q3_K/Q6_K, |x| for Q2_K).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError

F16 = torch.float16


@dataclass(frozen=True)
class GGUFType:
    """One llama.cpp weight type. Codes q are stored unsigned in [0, qmax]; symmetric types decode
    a·(q - offset), types with a min decode a·q - b. K-types store sub-block scales in ``scale_bits`` bits
    (``signed_scales``: two's-complement-like offset storage) under a float16 super-block scale."""

    name: str
    block: int
    sub: int
    qmax: int
    offset: int  # symmetric types: q - offset is the signed code; 0 with a min
    has_min: bool
    scale_bits: int | None  # None: legacy, the sub-block scale is the block's float16 d
    signed_scales: bool
    nbytes: int  # bytes per block
    weighting: str  # element weights without importance: "rms+abs", "square" or "abs"
    levels: tuple[int, ...] | None = None  # a codebook: code q decodes to levels[q] instead of q - offset

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.block


# ggml-common.h kvalues_iq4nl: the 4-bit non-linear codebook shared by IQ4_NL and IQ4_XS
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

TYPES = {t.name: t for t in [
    GGUFType("Q4_0", 32, 32, 15, 8, False, None, False, 18, "rms+abs"),
    GGUFType("Q4_1", 32, 32, 15, 0, True, None, False, 20, "rms+abs"),
    GGUFType("Q5_0", 32, 32, 31, 16, False, None, False, 22, "rms+abs"),
    GGUFType("Q5_1", 32, 32, 31, 0, True, None, False, 24, "rms+abs"),
    GGUFType("Q8_0", 32, 32, 255, 128, False, None, False, 34, "rms+abs"),
    GGUFType("Q2_K", 256, 16, 3, 0, True, 4, False, 84, "abs"),
    GGUFType("Q3_K", 256, 16, 7, 4, False, 6, True, 110, "square"),
    GGUFType("Q4_K", 256, 32, 15, 0, True, 6, False, 144, "rms+abs"),
    GGUFType("Q5_K", 256, 32, 31, 0, True, 6, False, 176, "rms+abs"),
    GGUFType("Q6_K", 256, 16, 63, 32, False, 8, True, 210, "square"),
    GGUFType("IQ4_NL", 32, 32, 15, 0, False, None, False, 18, "square", IQ4_LEVELS),
    GGUFType("IQ4_XS", 256, 32, 15, 0, False, 6, True, 136, "square", IQ4_LEVELS),
]}


def gguf_type(name: str) -> GGUFType:
    if name.upper() not in TYPES:
        raise SlimlmError(f"unknown GGUF type '{name}'; choose one of {', '.join(TYPES)}")
    return TYPES[name.upper()]


@dataclass
class Fitted:
    """A (rows, n) weight on a type's grid, as stored: codes q (rows, n) in [0, qmax]; d (rows, nblocks) float16;
    dmin (rows, nblocks) float16 for K-types with mins and the m of Q4_1/Q5_1 (then x = d·q + m); sc, mn
    (rows, nblocks, nsub) integer sub-block scales and mins of K-types (None for legacy types)."""

    kind: GGUFType
    q: torch.Tensor
    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mn: torch.Tensor | None = None

    def steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sub-block step a and additive term c (x = a·k + c, k = q - offset), float32 (rows, nblocks, nsub)."""
        d = self.d.float().unsqueeze(-1)
        if self.kind.scale_bits is None:
            a = d
            c = self.dmin.float().unsqueeze(-1) if self.kind.has_min else torch.zeros_like(a)
            return a, c
        a = d * self.sc.float()
        c = -(self.dmin.float().unsqueeze(-1) * self.mn.float()) if self.kind.has_min else torch.zeros_like(a)
        return a, c

    def values(self) -> torch.Tensor:
        """The float32 weights llama.cpp decodes (rows, n)."""
        rows, n = self.q.shape
        a, c = self.steps()
        k = signed_codes(self.kind, self.q).reshape(rows, -1, a.shape[-1], self.kind.sub)
        return _decode(self.kind, a, c, k).reshape(rows, n)


def signed_codes(kind: GGUFType, q: torch.Tensor) -> torch.Tensor:
    """What each stored code multiplies its step by, float32: q - offset, or the codebook's level."""
    if kind.levels is not None:
        return torch.tensor(kind.levels, dtype=torch.float32)[q.long()]
    return (q.long() - kind.offset).float()


def check_shape(kind: GGUFType, shape: tuple[int, ...], name: str = "weight") -> None:
    if len(shape) != 2 or shape[1] % kind.block:
        raise SlimlmError(f"{kind.name} needs rows that are a multiple of {kind.block} weights; {name} has rows "
                          f"of {shape[-1]}")


# ---------------------------------------------------------------- element weights and the sub-block search

def element_weights(kind: GGUFType, X: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Weights of each element's squared error in the scale search; X is (rows, nblocks, nsub, sub)."""
    if importance is not None:
        sigma2 = 2 * X.square().mean((-2, -1), keepdim=True)
        return importance.reshape(X.shape[-3:]) * (sigma2 + X.square()).sqrt()
    if kind.weighting == "square":
        return X.square()
    if kind.weighting == "abs":
        return X.abs()
    return X.abs() + X.square().mean(-1, keepdim=True).sqrt()


def _symmetric_search(X, W, nmax: int):
    """Best signed scale per sub-block for x ≈ s·l, l in [-nmax, nmax - 1] (make_qx_quants): candidates
    l = round(x·iscale) for iscale = -(nmax + 0.1·t) / xmax, t in -9..9 (xmax: the largest |x| with its sign),
    each with its least-squares s = Σwxl / Σwl²; keeps the largest (Σwxl)² / Σwl², the smallest weighted SSE."""
    idx = X.abs().argmax(-1, keepdim=True)
    xmax = X.gather(-1, idx)
    safe = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    best_s, best_score = torch.zeros_like(xmax), torch.full_like(xmax, -1.0)
    for t in range(-9, 10):
        L = torch.round(X * (-(nmax + 0.1 * t) / safe)).clamp(-nmax, nmax - 1)
        swxl, swl2 = (W * X * L).sum(-1, keepdim=True), (W * L * L).sum(-1, keepdim=True)
        score = torch.where(swl2 > 0, swxl.square() / swl2.clamp(min=1e-30), torch.zeros_like(swl2))
        better = score > best_score
        best_s = torch.where(better, swxl / swl2.clamp(min=1e-30), best_s)
        best_score = torch.where(better, score, best_score)
    return best_s.squeeze(-1)


def _min_search(X, W, nmax: int, clamp_min: bool, rmin=-0.9, rdelta=0.05, nstep=36):
    """Best (scale, min) per sub-block for x ≈ s·l + m, l in [0, nmax] (make_qkx3_quants): candidate
    iscale = (rmin + rdelta·t + nmax) / (xmax - xmin), t = 0..nstep, each solved by 2×2 weighted least squares
    (m clamped ≤ 0 for K-types, whose mins are stored as non-negative offsets); keeps the smallest weighted SSE."""
    xmin, xmax = X.amin(-1, keepdim=True), X.amax(-1, keepdim=True)
    if clamp_min:
        xmin = xmin.clamp(max=0)
    span = (xmax - xmin).clamp(min=1e-30)
    WX = W * X
    sw, swx, swx2 = W.sum(-1, keepdim=True), WX.sum(-1, keepdim=True), (WX * X).sum(-1, keepdim=True)
    best_s, best_m = span / nmax, xmin
    best_err = _sse(X, W, best_s, best_m, nmax)
    for t in range(nstep + 1):
        L = torch.round((X - xmin) * ((rmin + rdelta * t + nmax) / span)).clamp_(0, nmax)
        WL = W * L
        swl, swl2, swlx = WL.sum(-1, keepdim=True), (WL * L).sum(-1, keepdim=True), (WL * X).sum(-1, keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 0
        s = torch.where(ok, (sw * swlx - swx * swl) / torch.where(ok, det, 1), best_s)
        m = torch.where(ok, (swl2 * swx - swl * swlx) / torch.where(ok, det, 1), best_m)
        if clamp_min:
            positive = m > 0
            s = torch.where(positive, swlx / swl2.clamp(min=1e-30), s)
            m = torch.where(positive, torch.zeros_like(m), m)
        # weighted SSE of these codes L under (s, m), from the sums: Σw(sL + m - x)²
        err = swx2 - 2 * s * swlx - 2 * m * swx + s * s * swl2 + 2 * s * m * swl + m * m * sw
        better = (err < best_err) & (s > 0)
        best_s, best_m, best_err = (torch.where(better, s, best_s), torch.where(better, m, best_m),
                                    torch.where(better, err, best_err))
    return best_s.squeeze(-1), best_m.squeeze(-1)


def nearest_level(y: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Index of the codebook level nearest each y (a tie goes to the upper level)."""
    v = torch.tensor(levels, dtype=torch.float32)
    return torch.bucketize(y.contiguous(), (v[1:] + v[:-1]) / 2, right=True)


def _codebook_search(X, W, levels: tuple[int, ...], tries: int = 7):
    """Best signed scale per sub-block for x ≈ s·v[l] over a codebook v: the inverse scales -v[0] / xmax (the
    largest |x|, with its sign, on the positive end) and (v[0] + t) / xmax for t in -tries..tries (on and around
    the negative end, where the asymmetric codebook reaches further), each with its least-squares s =
    Σw·x·v / Σw·v²; keeps the largest (Σw·x·v)² / Σw·v², the smallest weighted SSE."""
    v = torch.tensor(levels, dtype=torch.float32)
    idx = X.abs().argmax(-1, keepdim=True)
    xmax = X.gather(-1, idx)
    safe = torch.where(xmax == 0, torch.ones_like(xmax), xmax)
    best_s, best_score = torch.zeros_like(xmax), torch.full_like(xmax, -1.0)
    for inverse in (-levels[0], *(levels[0] + t for t in range(-tries, tries + 1))):
        q = v[nearest_level(X * (inverse / safe), levels)]
        swxq, swq2 = (W * X * q).sum(-1, keepdim=True), (W * q * q).sum(-1, keepdim=True)
        score = torch.where(swq2 > 0, swxq.square() / swq2.clamp(min=1e-30), torch.zeros_like(swq2))
        better = score > best_score
        best_s = torch.where(better, swxq / swq2.clamp(min=1e-30), best_s)
        best_score = torch.where(better, score, best_score)
    return torch.where(xmax == 0, torch.zeros_like(best_s), best_s).squeeze(-1)


def _sse(X, W, s, m, nmax):
    L = torch.round((X - m) / s.clamp(min=1e-30)).clamp(0, nmax)
    return (W * (s * L + m - X).square()).sum(-1, keepdim=True)


# ---------------------------------------------------------------- fitting a weight onto a type

SCALE_FACTORS = (1.0, 0.98, 1.02, 0.96, 1.04, 0.93, 1.07)  # super-block scale candidates around the linear one


def fit(kind: GGUFType, X: torch.Tensor, importance: torch.Tensor | None = None) -> Fitted:
    """Quantize X (rows, n) onto ``kind``: the scale search per sub-block, the stored scales, then each weight
    rounded to the nearest level of its stored grid (RTN onto the format's own grid). ``importance`` (n,): the
    imatrix-style per-input weights (llama-imatrix's mean x², or GPTQ's Hessian diagonal), or None."""
    check_shape(kind, tuple(X.shape))
    rows, n = X.shape
    Xb = X.float().reshape(rows, n // kind.block, kind.block // kind.sub, kind.sub)
    W = element_weights(kind, Xb, None if importance is None else importance.float())
    if kind.levels is not None:
        s, m = _codebook_search(Xb, W, kind.levels), None
    elif kind.has_min:
        s, m = _min_search(Xb, W, kind.qmax, clamp_min=kind.scale_bits is not None)
    else:
        s, m = _symmetric_search(Xb, W, kind.offset), None
    if kind.scale_bits is None:
        fitted = Fitted(kind, torch.empty(0), s[..., 0].to(F16), None if m is None else m[..., 0].to(F16))
    else:
        fitted = _super_block_scales(kind, Xb, W, s, m)
    fitted.q = nearest_codes(fitted, Xb).reshape(rows, n)
    return fitted


def nearest_codes(fitted: Fitted, Xb: torch.Tensor) -> torch.Tensor:
    """Nearest stored code of each weight under the fitted steps (a sub-block with step 0 takes code offset)."""
    kind = fitted.kind
    a, c = (t.unsqueeze(-1) for t in fitted.steps())
    safe = torch.where(a == 0, torch.ones_like(a), a)
    if kind.levels is not None:  # a zero step keeps code 0, as ggml's zeroed block does
        return torch.where(a == 0, 0, nearest_level(Xb / safe, kind.levels)).to(torch.uint8)
    k = torch.round((Xb - c) / safe).clamp(-kind.offset, kind.qmax - kind.offset)
    k = torch.where(a == 0, torch.zeros_like(k), k)
    return (k + kind.offset).to(torch.uint8)


def _super_block_scales(kind: GGUFType, Xb, W, s, m) -> Fitted:
    """K-types: sub-block scales s (and mins -m) as integers of ``scale_bits`` bits under float16 d (and dmin),
    d chosen among SCALE_FACTORS around the linear choice by the weighted error of the final rounding."""
    if kind.has_min:
        top = 2**kind.scale_bits - 1
        d0, dmin = s.amax(-1) / top, (-m).clamp(min=0).amax(-1) / top
    else:
        top = 2 ** (kind.scale_bits - 1)
        d0 = -s.gather(-1, s.abs().argmax(-1, keepdim=True)).squeeze(-1) / top  # largest |s| takes -top
        dmin = None
    best, best_err = None, None
    for factor in SCALE_FACTORS:
        candidate = _quantized_scales(kind, s, m, d0 * factor, dmin)
        candidate.q = nearest_codes(candidate, Xb)
        err = (W * (_block_values(candidate) - Xb).square()).sum((-2, -1))
        if best is None:
            best, best_err = candidate, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        for field in ("d", "sc", "q"):
            keep = better.reshape(*better.shape, *[1] * (getattr(best, field).dim() - better.dim()))
            setattr(best, field, torch.where(keep, getattr(candidate, field), getattr(best, field)))
    return best


def _quantized_scales(kind: GGUFType, s, m, d, dmin) -> Fitted:
    d16 = d.to(F16)
    dq = d16.float().unsqueeze(-1)
    safe = torch.where(dq == 0, torch.ones_like(dq), dq)
    if kind.has_min:
        sc = torch.round(s / safe).clamp(0, 2**kind.scale_bits - 1)
        dmin16 = dmin.to(F16)
        dm = dmin16.float().unsqueeze(-1)
        mn = torch.round(-m / torch.where(dm == 0, torch.ones_like(dm), dm)).clamp(0, 2**kind.scale_bits - 1)
        return Fitted(kind, torch.empty(0), d16, dmin16, sc.to(torch.int16), mn.to(torch.int16))
    top = 2 ** (kind.scale_bits - 1)
    sc = torch.round(s / safe).clamp(-top, top - 1)
    return Fitted(kind, torch.empty(0), d16, None, sc.to(torch.int16))


def _block_values(fitted: Fitted) -> torch.Tensor:
    """Values of the fitted codes, shaped like the codes (rows, nblocks, nsub, sub)."""
    a, c = fitted.steps()
    return _decode(fitted.kind, a, c, signed_codes(fitted.kind, fitted.q))


def _decode(kind: GGUFType, a, c, k):
    """a·k (+ c with a min), per sub-block a, c broadcast over its weights; symmetric types add nothing, so a
    zero code under a negative step stays -0.0 as in ggml."""
    x = a.unsqueeze(-1) * k
    return x + c.unsqueeze(-1) if kind.has_min else x
