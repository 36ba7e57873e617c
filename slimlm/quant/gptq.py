"""GPTQ weight quantization.

Reference: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv 2210.17323), Algorithm 1. ``H`` (in, in) is the layer-input Hessian
(2/n)·Σ x xᵀ.
"""
import torch

from slimlm.core.linalg import column_loop_threads, drop_dead_inputs, hessian_inverse_cholesky
from slimlm.errors import SlimlmError
from slimlm.gguf.types import Fitted, GGUFType, check_shape, fit, nearest_codes, nearest_level, signed_codes
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

    def enter_group(Wt, j, group):
        """Scale and zero (each (out,)) of ``group``: precomputed, or from the current weights of its columns."""
        if params is not None:
            s, z = params[0][group], params[1][group]
        else:
            scale, zero = quant_params(Wt[j : j + gs].T, grid)
            s, z = scale[:, 0].contiguous(), zero[:, 0].contiguous()
        return lambda out, w, j: grid_values_into(out, w, s, z, grid)

    Q, row_loss = gptq_sweep(W, H, enter_group, group_of, blocksize, damp, perm)
    return Q.to(dtype).contiguous(), row_loss


def gptq_sweep(W, H, enter_group, group_of, blocksize, damp, perm=None):
    """GPTQ's column sweep over fp32 W (out, in) with dead inputs dropped, columns in the order ``perm`` (None:
    as they are). ``enter_group(Wt, j, group)``, called when the sweep reaches column j (in sweep order) of a new
    ``group_of[j]``, returns ``quantize_column(out, w, j)`` that writes the grid values of column w into out;
    Wt (in, out) holds the weights as updated so far. Returns Q (out, in) in the original column order and the
    OBS loss of each row."""
    U = hessian_inverse_cholesky(H, damp)
    Wt = W.T.contiguous()  # (in, out): a column is a contiguous row, as the sweep reads it (2x faster on CPU)
    Qt, row_loss = torch.empty_like(Wt), W.new_zeros(W.shape[0])
    with column_loop_threads(W.shape[0], blocksize):
        _gptq_sweep(Wt, U, Qt, row_loss, enter_group, group_of, blocksize)
    return (Qt.T if perm is None else Qt.T[:, torch.argsort(perm)]), row_loss


def _gptq_sweep(Wt, U, Qt, row_loss, enter_group, group_of, blocksize):
    """The sweep over the transposed weights Wt (in, out), in place on Wt, Qt and row_loss."""
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
                quantize_column = enter_group(Wt, j, current)
            q = quantize_column(Qt[j], W1[i], j)
            err = torch.sub(W1[i], q, out=Err1[i]).div_(diag[i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the block's remaining columns (eq. 3)
        row_loss += Err1.square().sum(0) / 2
        Wt[i2:].addmm_(U[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of all later columns


def gptq_gguf(W: torch.Tensor, H: torch.Tensor, kind: GGUFType, blocksize: int = 128, damp: float = 0.01,
              act_order: bool = False) -> tuple[Fitted, torch.Tensor]:
    """GPTQ onto a llama.cpp weight type: the sweep of ``gptq`` where, on entering each of the type's blocks
    (32 or 256 columns), the block's stored scales (float16 d, integer sub-block scales and mins) are fitted by
    the format's own search (``gguf.types.fit``, importance = diag(H), as llama-imatrix's mean x²) on the weights
    as updated so far, then fixed while its columns are rounded, so the error GPTQ minimises is that of the values
    llama.cpp decodes. ``act_order`` sweeps the columns of each block by decreasing diag(H) and keeps the blocks
    in order, so the block structure (and the scales fitted per block) is unchanged.

    Returns the fitted tensor (``Fitted.values()`` bit-identical to what ggml decodes) and the OBS loss per row.
    """
    n = W.shape[1]
    check_shape(kind, tuple(W.shape))
    if H.shape != (n, n) or blocksize < 1:
        raise SlimlmError(f"need H ({n}, {n}) for W {tuple(W.shape)}, blocksize >= 1; got {tuple(H.shape)}, {blocksize}")
    W, H = drop_dead_inputs(W, H)
    B, importance = kind.block, torch.diag(H).clone()
    perm = None
    if act_order:
        within = torch.argsort(-importance.reshape(-1, B), dim=1, stable=True)
        perm = (within + torch.arange(0, n, B).unsqueeze(1)).flatten()
        W, H = W[:, perm], H[perm][:, perm]
    order = perm if perm is not None else torch.arange(n)
    fits = {}

    def enter_group(Wt, j, group):
        cols = order[j : j + B]
        block = torch.empty(W.shape[0], B, dtype=W.dtype)
        block[:, cols - group * B] = Wt[j : j + B].T
        fitted = fits[group] = fit(kind, block, importance[group * B : (group + 1) * B])
        a, c = (t[:, 0].repeat_interleave(kind.sub, -1) for t in fitted.steps())  # (out, B) per column
        lo, hi = -kind.offset, kind.qmax - kind.offset
        safe = torch.where(a == 0, torch.ones_like(a), a)

        def quantize_column(out, w, j):
            p = int(order[j]) - group * B
            if kind.levels is not None:  # the codebook level nearest w / a
                return torch.mul(signed_codes(kind, nearest_level(w / safe[:, p], kind.levels)), a[:, p], out=out)
            torch.sub(w, c[:, p], out=out).div_(safe[:, p]).round_().clamp_(lo, hi).mul_(a[:, p])
            return out.add_(c[:, p]) if kind.has_min else out
        return quantize_column

    Q, row_loss = gptq_sweep(W, H, enter_group, (torch.arange(n) // B).tolist(), blocksize, damp, perm)
    stored = _stored(kind, [fits[g] for g in range(n // B)], Q)
    return stored, row_loss


def _stored(kind: GGUFType, fits: list[Fitted], Q: torch.Tensor) -> Fitted:
    """One Fitted for the whole weight from the per-block fits, codes read back from the swept values Q."""
    cat = lambda field: None if getattr(fits[0], field) is None else torch.cat([getattr(f, field) for f in fits], 1)
    whole = Fitted(kind, torch.empty(0), cat("d"), cat("dmin"), cat("sc"), cat("mn"))
    rows, n = Q.shape
    whole.q = nearest_codes(whole, Q.reshape(rows, n // kind.block, kind.block // kind.sub, kind.sub)).reshape(Q.shape)
    if (whole.values() - Q).abs().max() > 0:  # equal up to the sign of zeros
        raise SlimlmError("internal error: GPTQ's values are not on the stored grid")
    return whole
