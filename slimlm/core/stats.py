"""Statistics of a linear layer's input over the calibration tokens: channel norms and the layer Hessian.

The Gram matrices here (calibration Hessians XᵀX, and the ESD Grams WᵀW of ``analysis.spectra``) are formed as
their block lower triangle, which costs ~40% fewer flops than the full product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ACCUM_DTYPE = torch.float32  # statistics and compression math run in float32 (as GPTQ/SparseGPT do)
# Sums over windows run in float64 and are rounded to float32 once, in ``stats``: each window's own products are
# float32 computations of that window alone, so the statistics do not depend on how the windows were batched or
# split over torchrun ranks (a float32 running sum rounds differently for each split, and SparseGPT's greedy sweep
# and GPTQ's error feedback turn those last bits into different masks and roundings).
SUM_DTYPE = torch.float64


GRAM_BLOCKS = 4  # Gram matrices (ESD, calibration Hessians) in 4x4 column blocks, lower ones only (add_lower_gram_)


def add_lower_gram_(out: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``out += XᵀX`` on and below the diagonal blocks only (X (..., m, n), out (..., n, n)); returns ``out``.

    GRAM_BLOCKS column-block products X[:, a:]ᵀ·X[:, a:b], each the block column from the diagonal down: 10 of
    the 16 blocks of the full product, the same dot products. ``symmetrize_lower`` completes the matrix. Used for
    the ESD Gram matrices and for the calibration Hessians (engine), where XᵀX costs as much as the forward.
    """
    n = X.shape[-1]
    edges = [n * i // GRAM_BLOCKS for i in range(GRAM_BLOCKS + 1)]
    for a, b in zip(edges, edges[1:]):
        out[..., a:, a:b] += X[..., a:].mT @ X[..., a:b]
    return out


def symmetrize_lower(A: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is A's."""
    lower = A.tril()
    return lower + lower.tril(-1).mT


@dataclass
class LayerStats:
    """Statistics of one linear's input over all calibration tokens.

    ``sqnorm[j]`` = ‖X_j‖₂², the squared L2 norm of input channel j over every token (Wanda, RIA, OWL).
    ``hessian`` = (2/n)·Σ_t x_t x_tᵀ, the layer-wise reconstruction Hessian (SparseGPT, GPTQ), or None.
    ``total[j]`` = Σ_t x_tj, for the channel means and variances (FLAP's fluctuation and bias compensation).
    ``absmax[j]`` = max_t |x_tj| (SmoothQuant's and DuQuant's smoothing scales, DuQuant's channel ranking).
    ``window_mean`` = the input averaged over calibration windows, position by position (T, n), or None:
    DuQuant calibrates its rotations on this one tensor.
    """

    ntokens: int
    sqnorm: torch.Tensor
    hessian: torch.Tensor | None = None
    total: torch.Tensor | None = None
    absmax: torch.Tensor | None = None
    window_mean: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.ntokens

    @property
    def variance(self) -> torch.Tensor:
        """Per-channel variance over the calibration tokens (1/n normalisation)."""
        return (self.sqnorm / self.ntokens - self.mean.square()).clamp_min(0)


class Accumulator:
    def __init__(self, width: int, hessian: bool, device, window_mean: bool = False):
        self.ntokens, self.windows = 0, 0
        # with a Hessian the channel norms are its Gram's diagonal, so only one of the two is accumulated
        self.xtx = torch.zeros(width, width, dtype=SUM_DTYPE, device=device) if hessian else None
        self.sqnorm = None if hessian else torch.zeros(width, dtype=SUM_DTYPE, device=device)
        self.total = torch.zeros(width, dtype=SUM_DTYPE, device=device)
        self.absmax = torch.zeros(width, dtype=ACCUM_DTYPE, device=device)
        self.window_sum = 0 if window_mean else None
        self._gram = None  # one window's float32 Gram, reused
        self._stats = None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of windows (..., T, n) or of tokens (T, n)."""
        windows = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]
        if self.window_sum is not None:  # one sum per position
            self.window_sum = self.window_sum + windows.to(SUM_DTYPE).sum(0)
            self.windows += windows.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        torch.maximum(self.absmax, flat.abs().amax(0).to(ACCUM_DTYPE), out=self.absmax)
        self.ntokens += flat.shape[0]
        exact = flat.to(SUM_DTYPE)  # float32 -> float64 is exact; squares and sums then round at 2^-53
        self.total += exact.sum(0)
        if self.xtx is None:
            self.sqnorm += exact.square().sum(0)
            return
        for window in windows:  # ~40% fewer flops than the full product; completed in stats()
            self._gram = torch.zeros_like(self.xtx, dtype=ACCUM_DTYPE) if self._gram is None else self._gram.zero_()
            self.xtx += add_lower_gram_(self._gram, window.to(ACCUM_DTYPE))

    def stats(self) -> LayerStats:
        """Finalised statistics; computed once, as linears that share an input share this object."""
        if self._stats is None:
            mean = None if self.window_sum is None else (self.window_sum / self.windows).to(ACCUM_DTYPE)
            total = self.total.to(ACCUM_DTYPE)
            if self.xtx is None:
                self._stats = LayerStats(self.ntokens, self.sqnorm.to(ACCUM_DTYPE), total=total, absmax=self.absmax,
                                         window_mean=mean)
            else:  # Σ_t x_tj² is the Gram's diagonal
                self._stats = LayerStats(self.ntokens, torch.diagonal(self.xtx).to(ACCUM_DTYPE),
                                         symmetrize_lower(self.xtx).mul_(2.0 / self.ntokens).to(ACCUM_DTYPE), total,
                                         self.absmax, mean)
            self.xtx = self._gram = None  # the float64 sums are done with
        return self._stats
