"""Pruning methods: magnitude, Wanda, RIA and SparseGPT, unstructured or N:M.

Every method is a function ``(W, stats, sparsity, spec) -> (new W, keep mask)`` registered in
``METHODS`` by name. ``W`` is the (out, in) weight; ``stats`` the ``engine.LayerStats`` of its input.

N:M follows NVIDIA's convention: at most N non-zeros in every group of M consecutive input weights of a
row (2:4 keeps 2 of 4), so the sparsity is 1 - N/M.

Comparison groups are each paper's own (field.md A8), and can be overridden with ``group``:
  magnitude: per matrix; Wanda: per output row; RIA: per matrix; SparseGPT: adaptive per 128-column block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from slimlm.analysis import wanda_scores
from slimlm.engine import ACCUM_DTYPE, LayerStats
from slimlm.errors import SlimlmError
from slimlm.quant import (QuantGrid, column_loop_threads, column_quantizer, drop_dead_inputs,
                          hessian_inverse_cholesky, rtn)

GROUPS = ("row", "matrix")


@dataclass(frozen=True)
class PruneSpec:
    """How to prune; the per-layer sparsity comes separately (it may differ per layer).

    ``nm``: (N, M) for N:M, None for unstructured. ``group``: 'row'/'matrix'/None (the paper's).
    ``permute``: channel permutation before N:M (RIA's channel reallocation + assignment refinement).
    ``ria_alpha``: RIA's activation exponent a (paper default 0.5). ``blocksize``/``damp``: SparseGPT's
    column block (128) and dampening as a fraction of the mean Hessian diagonal (0.01).
    ``grid``: also quantize the kept weights (joint sparse + quantized): SparseGPT quantizes inside its
    OBS sweep, so the error of quantizing is compensated too; score methods round the kept weights (RTN).
    """

    nm: tuple[int, int] | None = None
    group: str | None = None
    permute: bool = False
    ria_alpha: float = 0.5
    blocksize: int = 128
    damp: float = 0.01
    grid: QuantGrid | None = None

    def __post_init__(self):
        if self.nm is not None:
            n, m = self.nm
            if not (0 < n < m):
                raise SlimlmError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
        if self.group not in (None, *GROUPS):
            raise SlimlmError(f"unknown comparison group '{self.group}': use row or matrix")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'unstructured' or None -> None; 'N:M' -> (N, M)."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise SlimlmError(f"pattern must be 'unstructured' or N:M like 2:4, got '{pattern}'") from None
    PruneSpec(nm=(n, m))  # validates
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not 0.0 <= sparsity < 1.0:
        raise SlimlmError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


# --------------------------------------------------------------------------- masks

def topk_mask(scores: torch.Tensor, sparsity: float, group: str) -> torch.Tensor:
    """Keep mask pruning the ``int(size * sparsity)`` lowest scores of each row or of the matrix.

    A stable sort makes ties (e.g. exact zeros) break by position, so results are deterministic.
    """
    mask = torch.ones_like(scores, dtype=torch.bool)
    if group == "row":
        k = int(scores.shape[1] * sparsity)
        if k:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, False)
        return mask
    k = int(scores.numel() * sparsity)
    if k:
        idx = torch.sort(scores.flatten(), stable=True).indices[:k]
        mask.view(-1)[idx] = False
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask with exactly the N highest scores of every M consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise SlimlmError(f"N:M with M={m} needs the input width ({cols}) to be a multiple of {m}")
    grouped = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, torch.topk(grouped, n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def retained_nm_score(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Sum of the scores an N:M mask keeps (the quantity channel permutation maximises)."""
    rows, cols = scores.shape
    return torch.topk(scores.reshape(rows, cols // m, m), n, dim=2).values.sum()


def _nm_slot_gain(others: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Retained score of every group g if candidate channel c fills its free slot: ``(C, G)``.

    ``others`` (rows, G, M-1) are each group's remaining channels, ``candidates`` (rows, C). With the
    remaining scores sorted a_1 >= a_2 >= ..., the top N of the M values is sum(a_1..a_{N-1}) +
    max(a_N, s_c), so the gain needs no sort per pair.
    """
    top = torch.sort(others, dim=2, descending=True).values
    base = top[:, :, : n - 1].sum(dim=(0, 2))                    # (G,)
    a_n = top[:, :, n - 1]                                        # (rows, G)
    gain = torch.empty(candidates.shape[1], a_n.shape[1], dtype=others.dtype, device=others.device)
    for s in range(0, candidates.shape[1], 64):                   # chunked: (chunk, rows, G)
        c = candidates[:, s:s + 64].T.unsqueeze(2)
        gain[s:s + 64] = torch.maximum(c, a_n.unsqueeze(0)).sum(1)
    return gain + base


def nm_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = 2) -> torch.Tensor:
    """Input-channel permutation that raises the score an N:M mask keeps (RIA, Sec. 3.3).

    Channel reallocation: rank channels by total score and deal them to the M-column groups in
    snake order, so heavy channels stop competing inside one group. Then refine slot by slot with a
    linear sum assignment (the paper's LSA step): empty one slot of every group and re-assign the
    removed channels to groups optimally. The identity is returned if nothing beats it, so the
    retained score never drops.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    groups = cols // m
    order = torch.argsort(scores.sum(0), descending=True, stable=True)
    tiers = order.view(m, groups).clone()
    tiers[1::2] = tiers[1::2].flip(1)                             # snake: 0..G-1, G-1..0, ...
    layout = tiers.T.contiguous()                                 # (G, M) channel ids per group
    for _ in range(rounds):
        for slot in range(m):
            keep = [j for j in range(m) if j != slot]
            others = scores[:, layout[:, keep]]                   # (rows, G, M-1)
            candidates = scores[:, layout[:, slot]]               # (rows, G)
            gain = _nm_slot_gain(others, candidates, n)
            c_idx, g_idx = linear_sum_assignment(gain.double().cpu().numpy(), maximize=True)
            new_slot = torch.empty_like(layout[:, slot])
            new_slot[torch.as_tensor(g_idx)] = layout[torch.as_tensor(c_idx), slot]
            layout[:, slot] = new_slot
    perm = layout.flatten()
    if retained_nm_score(scores[:, perm], n, m) <= retained_nm_score(scores, n, m):
        return torch.arange(cols, device=scores.device)
    return perm


def score_mask(scores: torch.Tensor, sparsity: float, spec: PruneSpec, default_group: str):
    """Keep mask from scores: N:M (optionally after channel permutation) or top-k per group.

    Returns ``(mask, perm)``; ``perm`` is the input-channel order in which the mask is exactly N:M
    (None when no permutation was applied).
    """
    if spec.nm is None:
        return topk_mask(scores, sparsity, spec.group or default_group), None
    n, m = spec.nm
    if not spec.permute:
        return nm_mask(scores, n, m), None
    perm = nm_permutation(scores, n, m)
    mask = torch.empty_like(scores, dtype=torch.bool)
    mask[:, perm] = nm_mask(scores[:, perm], n, m)
    return mask, perm


# --------------------------------------------------------------------------- scores

def magnitude_scores(W: torch.Tensor, stats: LayerStats | None, spec: PruneSpec) -> torch.Tensor:
    return W.abs()


def wanda(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> torch.Tensor:
    """Wanda (Sun et al. 2023, Eq. 1): S_ij = |W_ij| · ‖X_j‖₂."""
    return wanda_scores(W, stats.sqnorm)


def ria_scores(W: torch.Tensor, stats: LayerStats, spec: PruneSpec) -> torch.Tensor:
    """RIA (Zhang et al. 2024, Eq. 3): (|W_ij|/Σ_i|W_ij| + |W_ij|/Σ_j|W_ij|) · (‖X_j‖₂)^a.

    Relative importance divides by the weight's column sum (its input channel) and row sum (its
    output channel); a = 0.5 is the paper's default.
    """
    A = W.abs()
    tiny = torch.finfo(A.dtype).tiny
    relative = A / A.sum(0, keepdim=True).clamp_min(tiny) + A / A.sum(1, keepdim=True).clamp_min(tiny)
    return relative * stats.sqnorm.sqrt().pow(spec.ria_alpha).unsqueeze(0)


def _score_method(score_fn, default_group: str):
    def prune_fn(W, stats, sparsity, spec):
        Wf = W.to(ACCUM_DTYPE)
        mask, perm = score_mask(score_fn(Wf, stats, spec), sparsity, spec, default_group)
        new = Wf * mask if spec.grid is None else rtn(Wf * mask, spec.grid) * mask
        return new.to(W.dtype), mask, perm
    prune_fn.__doc__ = score_fn.__doc__
    return prune_fn


# --------------------------------------------------------------------------- SparseGPT

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


@dataclass(frozen=True)
class Method:
    fn: Callable
    needs_hessian: bool
    needs_data: bool
    default_group: str


METHODS = {
    "magnitude": Method(_score_method(magnitude_scores, "matrix"), False, False, "matrix"),
    "wanda": Method(_score_method(wanda, "row"), False, True, "row"),
    "ria": Method(_score_method(ria_scores, "matrix"), False, True, "matrix"),
    "sparsegpt": Method(sparsegpt, True, True, "block"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SlimlmError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    return METHODS[name]
