"""Keep masks from importance scores: top-k per row or matrix, N:M, and RIA's channel permutation for N:M."""
from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.pruning.spec import PruneSpec


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
