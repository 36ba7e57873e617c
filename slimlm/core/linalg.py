"""Linear algebra shared by the OBS-style methods (GPTQ, SparseGPT): damped inverse-Hessian Cholesky factors,
dead-input patching, and the thread setting of their column loops.
"""
import contextlib
import logging

import torch

from slimlm.core.stats import ACCUM_DTYPE
from slimlm.errors import SlimlmError

logger = logging.getLogger(__name__)


SMALL_UPDATE = 1 << 20  # loops whose ops touch fewer elements run single-threaded on CPU (small_op_threads)
DAMP_RETRIES = 3  # extra Cholesky attempts, each with 10x the damping


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
def small_op_threads(elements: int):
    """Run a loop of tensor ops on one CPU thread when each op touches fewer than SMALL_UPDATE elements.

    Below ~1M elements the thread pool's synchronisation costs more than the arithmetic, far more when another
    process holds a core (measured with 2 threads vs 1 on the built-in model's layers: OBS column loops 4-25x
    slower; ``analysis.sensitivity.pruning_error_table`` 3x and ``formats.codes.recover_grid`` 9x slower at a load
    average of 5). GPUs are unaffected.
    """
    previous = torch.get_num_threads()
    if elements < SMALL_UPDATE:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def column_loop_threads(rows: int, blocksize: int):
    """The thread setting of an OBS column loop, whose steps update (rows x <= blocksize) slices."""
    return small_op_threads(rows * blocksize)
