"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with the Cholesky factor of the damped inverse Hessian."""
from __future__ import annotations

import torch

from slimlm.core.linalg import column_loop_threads, drop_dead_inputs, hessian_inverse_cholesky
from slimlm.core.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.pruning.masks import nm_mask, topk_mask
from slimlm.pruning.spec import PruneSpec
from slimlm.quant.grids import column_quantizer


def sparsegpt(W: torch.Tensor, stats: LayerStats, sparsity: float, spec: PruneSpec):
    """SparseGPT (Frantar & Alistarh 2023, Alg. 1): OBS pruning with the inverse-Hessian Cholesky.

    Columns are swept left to right in blocks of ``spec.blocksize``. Unstructured: at the start of each
    block the mask keeps the weights with the largest w²/[H⁻¹]_cc² (one threshold over the whole
    block, the paper's adaptive mask selection); N:M: the N largest of that criterion in each M-column
    group, chosen when the sweep reaches the group. Each pruned (or, in joint mode, quantized)
    column's error is propagated to the not yet processed columns: inside the block column by column,
    to the rest of the matrix once per block (lazy batch update). ``spec.grid`` turns on the joint
    sparse+quantized mode (SparseGPT Sec. 4): kept weights are quantized in the same pass.
    """
    if spec.group not in (None, "block"):
        raise SlimlmError("SparseGPT chooses its mask per column block; --group does not apply")
    Wf, H = drop_dead_inputs(W, stats.hessian)
    Hinv = hessian_inverse_cholesky(H, spec.damp)
    quantize = None if spec.grid is None else column_quantizer(Wf, spec.grid)
    Wt = Wf.T.contiguous()  # (in, out): a column is a contiguous row, as the sweep reads it (as in quant.gptq)
    mask_t = torch.ones_like(Wt, dtype=torch.bool)
    with column_loop_threads(Wf.shape[0], spec.blocksize):
        _sparsegpt_sweep(Wt, Hinv, mask_t, sparsity, spec, quantize)
    return Wt.T.to(W.dtype).contiguous(), mask_t.T.contiguous(), None


def _sparsegpt_sweep(Wt, Hinv, mask_t, sparsity, spec, quantize):
    """The column sweep of ``sparsegpt`` over the transposed weights Wt (in, out), in place on Wt and mask_t.
    Masks are chosen on the (out, in) orientation, so ties break as on the untransposed matrix."""
    cols = Wt.shape[0]
    for i1 in range(0, cols, spec.blocksize):
        i2 = min(i1 + spec.blocksize, cols)
        W1, Hinv1, mask1 = Wt[i1:i2], Hinv[i1:i2, i1:i2], mask_t[i1:i2]  # views: updates land in Wt, mask_t
        d = torch.diag(Hinv1)
        d_list, Err1 = d.tolist(), torch.empty_like(W1)
        if spec.nm is None and sparsity > 0:
            mask1.copy_(topk_mask((W1.square() / d.square()[:, None]).T.contiguous(), sparsity, "matrix").T)
        for i in range(i2 - i1):
            if spec.nm is not None and i % spec.nm[1] == 0:
                n, m = spec.nm
                crit = W1[i:i + m].square() / d[i:i + m, None].square()
                mask1[i:i + m] = nm_mask(crit.T.contiguous(), n, m).T
            w = W1[i]
            q = w * mask1[i]
            if quantize is not None:
                q = quantize(q, i1 + i) * mask1[i]
            err = torch.sub(w, q, out=Err1[i]).div_(d_list[i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)  # OBS update of the block's remaining columns
            W1[i] = q
        Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)  # lazy batch update of all later columns
