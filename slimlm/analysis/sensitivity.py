"""Measured sensitivity: what compressing one layer costs, as an output-error table or as an estimated loss
increase from the empirical Fisher (the ``errortable`` and ``fisher`` allocators read these tables).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.core import distributed
from slimlm.core.architectures import linear_fqns
from slimlm.core.engine import compress_blocks
from slimlm.core.linalg import small_op_threads
from slimlm.pruning.scores import wanda_scores
from slimlm.pruning.sparsegpt import sparsegpt
from slimlm.pruning.spec import PruneSpec
from slimlm.quant.rtn import rtn

if TYPE_CHECKING:
    from slimlm.quant.grids import QuantGrid

ERROR_LEVELS = tuple(round(0.05 * i, 2) for i in range(20))  # sparsity 0 .. 0.95, the error-table grid


def pruning_error_table(W: torch.Tensor, sqnorm: torch.Tensor, hessian: torch.Tensor,
                        levels: Sequence[float] = ERROR_LEVELS) -> dict[float, float]:
    """Relative output error of this layer alone, Wanda-pruned per row at each sparsity level.

    error(s) = ‖X(W − W_s)ᵀ‖² / ‖XWᵀ‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H ∝ XᵀX, so the calibration
    inputs need not be kept. Relative (not absolute) error makes layers of different output scale
    comparable. Wanda's mask is the proxy for every method: it is what the data-aware methods start
    from, and it costs one sort per layer.

    The levels are nested (each row removes its lowest-scored weights first), so ΔW H grows level by level:
    ΔW_s H = ΔW_{s'} H + Z H, where Z holds only the weights removed between the two levels (the same number
    in every row, so Z H is a weighted sum of gathered rows of H: ``embedding_bag``). All levels together
    cost one pass over H per weight, about one dense product W H, where forming each level's ΔW H densely
    cost one product per level (measured 3x faster on the built-in model's linears, one thread; the
    running sum rounds differently, by ~1e-7 relative).
    """
    Wf, H = W.float(), hessian.float()
    table, removed = {}, 0
    with small_op_threads(W.numel()):
        order = torch.sort(wanda_scores(Wf, sqnorm), dim=1, stable=True).indices
        dense = ((Wf @ H) * Wf).sum().clamp_min(torch.finfo(torch.float32).tiny)
        dW, dWH = torch.zeros_like(Wf), torch.zeros_like(Wf)  # ΔW at the current level, and ΔW H
        for s in sorted(levels):
            k = int(Wf.shape[1] * s)
            if k > removed:
                cols = order[:, removed:k]  # each row's weights removed between the previous level and this one
                values = Wf.gather(1, cols)
                dWH += F.embedding_bag(cols, H, per_sample_weights=values, mode="sum")  # Z H, row by row
                dW.scatter_(1, cols, values)
                removed = k
            table[float(s)] = ((dWH * dW).sum() / dense).item()
    return {float(s): table[float(s)] for s in levels}


FISHER_WINDOWS = 16  # calibration windows for the Fisher pass (the first ones; 16 × 512 tokens in the benchmarks)


def fisher_diagonal(model, windows: torch.Tensor, progress: bool = True) -> tuple[dict, dict]:
    """Empirical Fisher diagonal of every block linear's weight, and its inputs' channel norms ‖X_j‖₂².

    F_ij = mean over windows of (∂L_w/∂W_ij)², L_w = the window's mean next-token NLL under the model's own
    forward (so the gradient carries how every later block and the head amplify a change of W_ij). Per-window
    rather than per-token gradients scale F by a common factor, which cancels in the allocation. Only the
    block linears' weights require grad while this runs; the channel norms come from the same forwards.
    """


    linears = linear_fqns(model)
    fisher = {f: torch.zeros(lin.weight.shape, dtype=torch.float32) for f, lin in linears.items()}
    sqnorms = {f: torch.zeros(lin.in_features, dtype=torch.float32) for f, lin in linears.items()}

    def hook_for(fqn):
        def hook(module, args):
            sqnorms[fqn] += args[0].detach().reshape(-1, args[0].shape[-1]).float().square().sum(0)
        return hook

    flags = [p.requires_grad for p in model.parameters()]
    handles = [lin.register_forward_pre_hook(hook_for(f)) for f, lin in linears.items()]
    try:
        model.requires_grad_(False)
        weights = [lin.weight.requires_grad_(True) for lin in linears.values()]
        # under torchrun each rank takes its share of the windows and the sums are added up after
        for w in tqdm(distributed.shard_windows(windows, 1)[0].split(1), desc="fisher", disable=not progress):
            with torch.enable_grad():
                loss = model(input_ids=w, labels=w, use_cache=False).loss
                grads = torch.autograd.grad(loss, weights)
            for total, g in zip(fisher.values(), grads):
                total.addcmul_(g.float(), g.float(), value=1.0 / windows.shape[0])
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    distributed.sum_([*fisher.values(), *sqnorms.values()])
    return fisher, sqnorms


def fisher_tables(model, fisher: dict, sqnorms: dict, levels: Sequence[float] = ERROR_LEVELS,
                  progress: bool = False) -> dict[str, dict]:
    """Per linear: estimated loss increase when it alone is Wanda-pruned per row at each sparsity level.

    Optimal Brain Damage (LeCun et al. 1990, Eq. 5) with the empirical Fisher as the diagonal Hessian: at a
    trained model the gradient term vanishes and removing w_ij costs ½·F_ij·w_ij². Summed over the weights Wanda
    would prune (each row's lowest |W_ij|·‖X_j‖₂ first): a cumulative sum along that order gives every level at
    once, so the tables cost one sort per linear.
    """
    tables = {}
    for fqn, lin in tqdm(linear_fqns(model).items(), desc="fisher tables", disable=not progress):
        W = lin.weight.detach().float()
        with small_op_threads(W.numel()):
            order = torch.sort(wanda_scores(W, sqnorms[fqn]), dim=1, stable=True).indices
            cost = (0.5 * fisher[fqn] * W.square()).gather(1, order).sum(0, dtype=torch.float64).cumsum(0)
        cost = torch.cat([cost.new_zeros(1), cost])  # cost[k]: every row's k lowest-scored weights removed
        tables[fqn] = {float(s): cost[int(W.shape[1] * s)].item() for s in levels}
    return tables


def fisher_bit_tables(model, fisher: dict, grid_for: Callable[[int], "QuantGrid"], levels: Sequence[int],
                      progress: bool = False) -> dict:
    """Per linear: estimated loss increase when it alone is RTN-quantized at each bit-width.

    The same Optimal Brain Damage estimate as ``fisher_tables`` with the rounding error as the change:
    ½·Σ F_ij·(w_ij − q_ij)², q = ``quant.rtn.rtn`` on ``grid_for(bits)`` (a Fisher-weighted form of HAWQ's
    Hessian sensitivity, Dong et al. 2019). GPTQ lowers every level's error, but the ranking of layers is what
    the allocation needs.
    """
    tables = {}
    for fqn, lin in tqdm(linear_fqns(model).items(), desc="fisher bit tables", disable=not progress):
        W = lin.weight.detach().float()
        with small_op_threads(W.numel()):
            tables[fqn] = {float(b): (0.5 * fisher[fqn] * (W - rtn(W, grid_for(b)).float()).square())
                           .sum(dtype=torch.float64).item() for b in levels}
    return tables


def fisher_sparsegpt_tables(model, windows: torch.Tensor, fisher: dict, levels: Sequence[float] = ERROR_LEVELS,
                            progress: bool = True) -> dict[str, dict]:
    """Per linear: estimated loss increase when it alone is pruned by SparseGPT at each sparsity level.

    ``fisher_tables`` charges each removed weight ½·F_ij·w_ij², which ignores SparseGPT's compensating updates of
    the kept weights: SparseGPT changes far more weights than it removes, and makes the layer's output error much
    smaller than the removals alone. Here the change is SparseGPT's own, ΔW = W − sparsegpt(W, H, s), priced
    with a Kronecker-factored Fisher (K-FAC, Martens & Grosse 2015): F ≈ diag(g) ⊗ H, so the cost is
    ½·Σ_r g_r·ΔW_r H ΔW_rᵀ, where H is the layer's input Hessian from the calibration windows. g_r, the output
    row's sensitivity, is fitted to the diagonal Fisher so that removing all of row r costs what Optimal Brain
    Damage says: g_r = Σ_j F_rj·w_rj² / Σ_j H_jj·w_rj². One dense pass of the engine gives every H; each level
    runs one SparseGPT per linear (about a minute per level for the built-in model on 2 CPU cores).
    """
    tables = {}

    def record(group, stats):
        H = stats.hessian.float()
        for fqn, linear in group.items():
            W = linear.weight.detach().float()
            W2 = W.square()
            g = (fisher[fqn] * W2).sum(1) / (W2 @ torch.diag(H)).clamp_min(torch.finfo(torch.float32).tiny)
            table = {}
            for s in levels:
                dW = W - sparsegpt(W, stats, float(s), PruneSpec())[0].float() if s > 0 else torch.zeros_like(W)
                table[float(s)] = (0.5 * g * ((dW @ H) * dW).sum(1)).sum(dtype=torch.float64).item()
            tables[fqn] = table
        return False

    compress_blocks(model, windows, record, set(linear_fqns(model)), hessian=True, progress=progress,
                    device=next(model.parameters()).device, sequential=False, results=(tables,))
    return tables
