"""GPTQ weight quantization.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323), Algorithm 1. ``H`` (in, in) is the layer-input Hessian
(2/n)·Σ x xᵀ.
"""
import torch

from slimlm.core.linalg import column_loop_threads, drop_dead_inputs, hessian_inverse_cholesky
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid, grid_values_into, quant_params


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
            q = grid_values_into(Qt[j], W1[i], s, z, grid)
            err = torch.sub(W1[i], q, out=Err1[i]).div_(diag[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the block's remaining columns (eq. 3)
        row_loss += Err1.square().sum(0) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of all later columns
