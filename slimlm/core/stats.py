"""Statistics of a linear layer's input over the calibration tokens: channel norms and the layer Hessian.

The Gram matrices here (calibration Hessians XᵀX, and the ESD Grams WᵀW of ``analysis.spectra``) are formed as
their block lower triangle, which costs ~40% fewer flops than the full product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ACCUM_DTYPE = torch.float32  # statistics and compression math run in float32 (as GPTQ/SparseGPT do)


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
        self.xtx = torch.zeros(width, width, dtype=ACCUM_DTYPE, device=device) if hessian else None
        self.sqnorm = None if hessian else torch.zeros(width, dtype=ACCUM_DTYPE, device=device)
        self.total = torch.zeros(width, dtype=ACCUM_DTYPE, device=device)
        self.absmax = torch.zeros(width, dtype=ACCUM_DTYPE, device=device)
        self.window_sum = 0 if window_mean else None
        self._stats = None

    def add(self, x: torch.Tensor) -> None:
        if self.window_sum is not None:  # (windows, T, n): one sum per position
            self.window_sum = self.window_sum + x.reshape(-1, *x.shape[-2:]).to(ACCUM_DTYPE).sum(0)
            self.windows += x.reshape(-1, *x.shape[-2:]).shape[0]
        x = x.reshape(-1, x.shape[-1]).to(ACCUM_DTYPE)
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        self.ntokens += x.shape[0]
        self.total += x.sum(0)
        if self.xtx is None:
            self.sqnorm += x.square().sum(0)
        else:  # ~40% fewer flops than the full product; completed in stats()
            add_lower_gram_(self.xtx, x)

    def stats(self) -> LayerStats:
        """Finalised statistics; computed once, as linears that share an input share this object."""
        if self._stats is None:
            mean = None if self.window_sum is None else self.window_sum / self.windows
            if self.xtx is None:
                self._stats = LayerStats(self.ntokens, self.sqnorm, total=self.total, absmax=self.absmax,
                                         window_mean=mean)
            else:  # Σ_t x_tj² is the Gram's diagonal
                self._stats = LayerStats(self.ntokens, torch.diagonal(self.xtx).clone(),
                                         symmetrize_lower(self.xtx).mul_(2.0 / self.ntokens), self.total,
                                         self.absmax, mean)
        return self._stats
