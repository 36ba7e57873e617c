"""Weight, activation and KV quantization primitives: grids, RTN, GPTQ, Hadamard rotations, packing.

Pure tensor functions; no model, hooks or printing. Weights are ``W`` (out, in) and act on inputs ``x`` (in,);
``H`` (in, in) is the layer-input Hessian (2/n)·Σ x xᵀ. Groups run along the input (last) dimension.

References:
- GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
  Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323), Algorithm 1.
- QuaRot: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024 (arXiv 2404.00456), §3.
- Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933): Hadamard constructions I and II.
"""

import contextlib
import functools
import logging
import math
import numbers
from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError
import torch.nn.functional as F

logger = logging.getLogger(__name__)

ACCUM_DTYPE = torch.float32  # all quantization math runs in fp32, cast back once (GPTQ does the same)
CODE_DTYPE = torch.int16  # holds signed codes [-128, 127] and unsigned codes [0, 255] alike
SMALL_UPDATE = 1 << 20  # column-loop slices below this many elements run single-threaded on CPU
DAMP_RETRIES = 3  # extra Cholesky attempts, each with 10x the damping


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


# ---------------------------------------------------------------- grids, RTN

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


def _grid_values_into(out: torch.Tensor, w, scale, zero, grid: QuantGrid) -> torch.Tensor:
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


def rtn(W: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Round-to-nearest weight quantization: the data-free baseline GPTQ is compared against."""
    return fake_quant(W, grid)


def column_quantizer(W: torch.Tensor, grid: QuantGrid):
    """``fn(column, j)`` that quantizes column j of W on the grid of its group, with parameters set once
    from W itself (static groups). SparseGPT's joint sparse+quantized sweep uses this: the reference code
    fixes its quantizer on the full W before the sweep, and static groups keep pruned zeros on the grid.
    """
    scale, zero = quant_params(W, grid)
    gs = grid.group_size or W.shape[1]

    def quantize_column(column: torch.Tensor, j: int) -> torch.Tensor:
        s, z = scale[:, j // gs], zero[:, j // gs]
        return _grid_values_into(torch.empty_like(column), column, s, z, grid)
    return quantize_column


def quantize_activations(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, symmetric: bool = True, group_size: int | None = None
) -> torch.Tensor:
    """Simulated per-token dynamic quantization of activations or K/V (QuaRot §3: one scale per row of the last
    dim, computed on the fly). ``group_size`` splits the row into groups (e.g. per head for KV). Returns float."""
    return fake_quant(x, QuantGrid(bits, symmetric, group_size, clip_ratio))


# ---------------------------------------------------------------- GPTQ

def drop_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies of W and H with dead inputs (H_jj == 0, never active in calibration) patched: H_jj = 1 and
    W[:, j] = 0. Their weights cannot affect the calibration output, and the patch keeps H invertible (as GPTQ's
    and SparseGPT's reference code do)."""
    W, H = W.to(ACCUM_DTYPE).clone(), H.to(device=W.device, dtype=ACCUM_DTYPE).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def hessian_inverse_cholesky(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), λ = damp · mean(diag H), in fp32.

    Row q of U holds GPTQ's OBS quantities (eq. 2-3) for column q once columns < q are fixed (§4, "Cholesky
    reformulation"): U_qq² = [H_F⁻¹]_qq, and quantizing w_q to q updates the remaining columns by
    −(w_q − q) / U_qq · U_q,q:. Shared by GPTQ and SparseGPT. If a Cholesky
    factorization fails, damp is multiplied by 10 (from 1e-3 if it was 0) up to DAMP_RETRIES times, with a
    warning; then RuntimeError. Non-finite or negative-diagonal H raises ValueError.
    """
    H = H.to(ACCUM_DTYPE)
    diag = torch.diag(H)
    if not torch.isfinite(H).all() or (diag < 0).any():
        raise SlimlmError("H must be a finite PSD Hessian (2/n)·Σ x xᵀ; check the calibration inputs for NaN/inf")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(DAMP_RETRIES + 1):
        # U without forming the inverse: with J the exchange matrix (flip), J·H·J = L·Lᵀ gives
        # H⁻¹ = (J·L⁻¹·J)ᵀ(J·L⁻¹·J), and J·L⁻¹·J is upper triangular with a positive diagonal, hence H⁻¹'s
        # unique upper Cholesky factor. One Cholesky and one triangular solve instead of Cholesky, inverse and
        # a second Cholesky: several times faster on CPU, and the inverse's rounding never enters.
        L, info = torch.linalg.cholesky_ex((H + damp * diag.mean() * eye).flip(0, 1))
        if info == 0:
            return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
        if attempt < DAMP_RETRIES:
            new = damp * 10 if damp > 0 else 1e-3
            logger.warning("Cholesky of the damped Hessian failed at damp=%g; retrying with damp=%g", damp, new)
            damp = new
    raise RuntimeError(f"Hessian not positive definite even with damp={damp:g}; check for NaN/inf activations")


@contextlib.contextmanager
def column_loop_threads(rows: int, blocksize: int):
    """Run an OBS column loop on one CPU thread when its per-column updates are small.

    Each step updates a (rows x <= blocksize) slice; below ~1M elements the thread pool's
    synchronisation costs more than the arithmetic (measured 4-25x slower with 2 threads on the
    built-in model's layers, far worse when another process holds a core). GPUs are unaffected.
    """
    previous = torch.get_num_threads()
    if rows * blocksize < SMALL_UPDATE:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: QuantGrid,
    blocksize: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2022, Algorithm 1): quantize W (out, in) column by column, each time spreading the
    rounding error over the columns not yet quantized by the OBS update, with lazy batch updates every
    ``blocksize`` columns. All rows are processed at once; the column loop is the algorithm.

    Rows are independent given H, so W may stack the rows of several linears that read the same input (q/k/v,
    gate/up): one inverse-Hessian factor and one column sweep serve them all, with the same result.
    Groups: by default a group's scale/zero are computed when the sweep enters it, on the weights as updated
    so far (as GPTQ does). When the group lies inside the current block (always when group_size divides
    blocksize) these weights are fully updated; GPTQ's reference reads a stale copy there.
    ``static_groups``: all group parameters computed up front on the original weights.
    ``act_order``: columns swept by decreasing diag(H) (GPTQ repo's "act-order"), permutation undone at the
    end. With groups it implies static groups on the original column order, so groups stay contiguous and Q
    exports without a g_idx (llm-compressor's actorder="weight" behaves the same way).

    Returns Q (W's dtype, on the grid) and the loss of each row, Σ_q (w_q − quant(w_q))² / (2 [H_F⁻¹]_qq), the
    OBS error sum. Summed over rows it equals ½ Σ_rows (W−Q) H̃ (W−Q)ᵀ with H̃ the damped Hessian; with
    H = (2/n)XᵀX that is the squared layer output error ‖X(W−Q)ᵀ‖² / n plus the damping term.
    """
    dtype, n = W.dtype, W.shape[1]
    if H.shape != (n, n) or blocksize < 1:
        raise SlimlmError(f"need H ({n}, {n}) for W {tuple(W.shape)}, blocksize >= 1; got {tuple(H.shape)}, {blocksize}")
    W, H = drop_dead_inputs(W, H)
    gs = grid.group_size or n
    static = grid.group_size is None or static_groups or act_order
    params = [t.T.contiguous() for t in quant_params(W, grid)] if static else None  # (ngroups, out) each
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    group_of = [j // gs for j in range(n)] if perm is None else (perm // gs).tolist()  # original group per column
    U = hessian_inverse_cholesky(H, damp)
    Wt = W.T.contiguous()  # (in, out): a column is a contiguous row, as the sweep reads it (2x faster on CPU)
    Qt, row_loss = torch.empty_like(Wt), W.new_zeros(W.shape[0])
    with column_loop_threads(W.shape[0], blocksize):
        _gptq_sweep(Wt, U, Qt, row_loss, grid, params, group_of, gs, blocksize)
    Q = Qt.T if perm is None else Qt.T[:, torch.argsort(perm)]
    return Q.to(dtype).contiguous(), row_loss


def _sweep_group_params(Wt, j, gs, grid, params, group):
    """Scale and zero (each (out,)) of ``group``: precomputed, or from the current weights of its columns."""
    if params is not None:
        return params[0][group], params[1][group]
    scale, zero = quant_params(Wt[j : j + gs].T, grid)
    return scale[:, 0].contiguous(), zero[:, 0].contiguous()


def _gptq_sweep(Wt, U, Qt, row_loss, grid, params, group_of, gs, blocksize):
    """GPTQ's column sweep over the transposed weights Wt (in, out), in place on Wt, Qt and row_loss.
    ``params``: (scale, zero) per (group, row), or None to set a group's when the sweep enters it."""
    n, current = Wt.shape[0], None
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, U1 = Wt[i1:i2], U[i1:i2, i1:i2]  # W1 is a view: in-block updates land in Wt
        Err1 = torch.empty_like(W1)
        diag = torch.diag(U1).tolist()
        for i in range(i2 - i1):
            j = i1 + i
            if group_of[j] != current:
                current = group_of[j]
                s, z = _sweep_group_params(Wt, j, gs, grid, params, current)
            q = _grid_values_into(Qt[j], W1[i], s, z, grid)
            err = torch.sub(W1[i], q, out=Err1[i]).div_(diag[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the block's remaining columns (eq. 3)
        row_loss += Err1.square().sum(0) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of all later columns


# ---------------------------------------------------------------- rotations

_H2 = torch.tensor([[1.0, 1], [1, -1]])  # Sylvester's building block


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley_prime(n: int) -> tuple[int, int] | None:
    """(q, 1) if n = q + 1 with q ≡ 3 mod 4 prime (Paley I), (q, 2) if n = 2(q + 1) with q ≡ 1 mod 4 prime (II)."""
    if n % 4 == 0 and _is_prime(n - 1):
        return n - 1, 1
    if n % 8 == 4 and _is_prime(n // 2 - 1):
        return n // 2 - 1, 2
    return None


def _paley(n: int) -> torch.Tensor:
    """Unnormalized ±1 Hadamard matrix of order n by Paley's construction over the prime field F_q.

    With χ the Legendre symbol mod q and the Jacobsthal matrix Q_ij = χ(j − i), C = [[0, 1ᵀ], [±1, Q]]:
    I (q ≡ 3 mod 4): Q is antisymmetric, C skew (lower-left −1), C Cᵀ = qI, so H = I + C.
    II (q ≡ 1 mod 4): C symmetric, H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]].
    """
    q, kind = _paley_prime(n)
    chi = -torch.ones(q)
    chi[torch.arange(1, q) ** 2 % q] = 1  # quadratic residues
    chi[0] = 0
    C = torch.zeros(q + 1, q + 1)
    C[0, 1:] = 1
    C[1:, 0] = -1 if kind == 1 else 1
    C[1:, 1:] = torch.stack([chi.roll(r) for r in range(q)])  # row r: χ(j − r), a circulant
    if kind == 1:
        return C + torch.eye(q + 1)
    return torch.kron(C, _H2) + torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1], [-1, -1]]))


@functools.lru_cache(maxsize=None)
def _hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product builds a Hadamard matrix of order n: 2 (Sylvester) or Paley orders.

    Powers of two are pure Sylvester (the fast Walsh-Hadamard transform's matrix); otherwise the largest power
    of two is split off that leaves a Paley order (the smallest dense block); failing that, any split into two
    constructible orders.
    """
    if n & (n - 1) == 0:
        return (2,) * (n.bit_length() - 1)
    if n % 4:
        return None  # Hadamard orders above 2 are multiples of 4
    twos = (n & -n).bit_length() - 1
    for k in range(twos, -1, -1):
        if _paley_prime(n >> k):
            return (2,) * k + (n >> k,)
    for d in range(3, math.isqrt(n) + 1):
        if n % d == 0:
            a, b = _hadamard_factors(d), _hadamard_factors(n // d)
            if a is not None and b is not None:
                return a + b
    return None


def has_hadamard(n: int) -> bool:
    """Whether hadamard_matrix(n) can build order n."""
    return _hadamard_factors(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonal Hadamard matrix H/√n (H Hᵀ = I) of order n.

    Built as a Kronecker product of 2x2 Sylvester blocks and one Paley block over a prime field (order q+1,
    q ≡ 3 mod 4, or 2(q+1), q ≡ 1 mod 4), e.g. 12, 20, 28, 36; 64 = 2^6 (pure Sylvester, every power of two);
    576 = 16·36 (q = 17); 960 = 16·60; 1536 = 128·12; 11008 = 2·5504 (q = 5503); 13824 = 128·108;
    14336 = 512·28; 18944 = 128·148. Orders that need prime-power fields or other constructions raise
    ValueError: the smallest is 52, then 92, 100, 116, 156, 172, 184, 188, ... (156 of the 512 multiples of 4 up
    to 2048). ``has_hadamard`` tells in advance; ``random_hadamard`` falls back to a random orthogonal matrix.
    """
    factors = _hadamard_factors(n)
    if factors is None:
        raise SlimlmError(f"no Hadamard construction for order {n}; use random_orthogonal({n}, seed) instead")
    blocks = [(_paley(f) if f > 2 else _H2).to(dtype) / math.sqrt(f) for f in factors]  # each block orthogonal
    return functools.reduce(torch.kron, blocks, torch.ones(1, 1, dtype=dtype))


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Haar-random orthogonal matrix: QR of a seeded Gaussian, columns sign-fixed by diag(R) so the
    distribution is uniform (otherwise QR's sign convention biases it). Computed in float64."""
    G = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diag(R))).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QuaRot's randomized Hadamard H·diag(s), s ∈ {±1}ⁿ seeded: orthogonal, spreads outliers like H but is a
    different rotation per seed. Orders without a Hadamard construction fall back to random_orthogonal (warned)."""
    if not has_hadamard(n):
        logger.warning("no Hadamard matrix of order %d; using a random orthogonal matrix instead", n)
        return random_orthogonal(n, seed, dtype)
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return hadamard_matrix(n, dtype) * signs.to(dtype)


# ---------------------------------------------------------------- storage

def _word_bytes(count: int, bits: int) -> int:
    """Bytes of `count` b-bit codes packed densely into int32 words."""
    return math.ceil(count * bits / 32) * 4


def pack_int(codes: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Pack b-bit codes along the last dim into int32 words, densely: code i occupies bits [i·b, i·b + b) of a
    little-endian bit stream, so each row takes ceil(n·b/32) words (the last zero-padded) and a code may straddle
    two words when 32 % b != 0. Signed codes are stored offset by 2^(b-1). This is compressed-tensors'
    pack-quantized layout (pack_to_int32, packed_dim=1); for 4 and 8 bits it is the classic 8 or 4 codes per word.
    """
    if not 1 <= bits <= 8:
        raise SlimlmError(f"bits must be in 1..8 for packing, got {bits!r}")
    n = codes.shape[-1]
    u = codes.to(torch.int64) + (2 ** (bits - 1) if signed else 0)
    if u.numel() and (u.min() < 0 or u.max() >= 2**bits):
        raise SlimlmError(f"codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} packing")
    u = F.pad(u, (0, -n % 32)).unflatten(-1, (-1, 32)).movedim(-1, 0).contiguous()  # (32, ..., chunks)
    words = u.new_zeros(bits, *u.shape[1:])  # a chunk of 32 codes fills exactly `bits` words
    for k in range(32):
        w, shift = divmod(k * bits, 32)
        words[w] |= (u[k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[w + 1] |= u[k] >> (32 - shift)
    words = words.movedim(0, -1).flatten(-2)[..., : math.ceil(n * bits / 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32


def unpack_int(packed: torch.Tensor, bits: int, n: int, signed: bool = False) -> torch.Tensor:
    """Inverse of pack_int: the first n codes of each row of int32 words, as CODE_DTYPE."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = F.pad(words, (0, -words.shape[-1] % bits)).unflatten(-1, (-1, bits)).movedim(-1, 0).contiguous()
    u = words.new_zeros(32, *words.shape[1:])  # (32, ..., chunks)
    for k in range(32):
        w, shift = divmod(k * bits, 32)
        u[k] = words[w] >> shift
        if shift + bits > 32:
            u[k] |= words[w + 1] << (32 - shift)
    u = (u & (2**bits - 1)).movedim(0, -1).flatten(-2)[..., :n]
    return (u - (2 ** (bits - 1) if signed else 0)).to(CODE_DTYPE)


def packed_bytes(shape: tuple[int, int], grid: QuantGrid, mask_density: float | None = None) -> int:
    """Real bytes of a (out, in) weight stored as packed integer codes (the compressed-tensors layout):

    - codes: pack_int per row, ceil(in·b/32) int32 words; if ``mask_density`` (kept fraction) is given, only
      round(density·out·in) kept codes are packed (one dense stream) plus a 1-bit mask, ceil(in/8) bytes per row;
    - scales: float16 per (row, group);
    - zero points (asymmetric only): b-bit, packed along the output dim, ceil(out·b/32) words per group.
    """
    out, n = shape
    ngroups = 1 if grid.group_size is None else math.ceil(n / grid.group_size)
    if mask_density is None:
        codes = out * _word_bytes(n, grid.bits)
    elif 0 < mask_density <= 1:
        codes = _word_bytes(round(mask_density * out * n), grid.bits) + out * math.ceil(n / 8)
    else:
        raise SlimlmError(f"mask_density is the kept fraction, in (0, 1]; got {mask_density!r}")
    zeros = 0 if grid.symmetric else ngroups * _word_bytes(out, grid.bits)
    return codes + out * ngroups * 2 + zeros
