"""DuQuant's dual transformation: block rotations around the outliers, a zigzag permutation, a second rotation.

Reference: Lin et al., "DuQuant: Distributing Outliers via Dual Transformation Makes Stronger Quantized LLMs",
NeurIPS 2024, §3, and its code (Hsu1023/DuQuant quantize/duquant.py, quantize/quantizer.py). For each linear's input
X (after SmoothQuant's smoothing):
  X -> X R̂₁ P R̂₂, with R̂ₖ = I ⊗ Rₖ block-diagonal (one b×b matrix shared by every block of b channels);
the weights take the same orthogonal transform, so the product is unchanged.

1. ``greedy_rotation``: repeatedly find the largest-magnitude entry, and rotate its block coordinate into the
   uniform direction (an orthogonal matrix whose row for that coordinate is (1/√b)·1, completed by a random
   rotation of the other b−1 directions); keep the prefix of steps whose peak range (max − min) is smallest.
   The outlier index: the paper picks the outlier *channel*; the released code passes the row index of the
   (−1, b) view of the tensor (quantize/quantizer.py, ``UniformAffineQuantizer.rotation``). We take the channel
   (column mod b): the row of the flattened view is a token/block number, which says nothing about which
   coordinate to rotate, and the paper's analysis (the outlier spread over its block) holds only for the channel.
2. ``zigzag_permutation``: deal channels, ranked by their max |x|, into the K = n/b blocks in the order
   0, 1, ..., K−1, K−1, ..., 0, 0, 1, ... so every block gets a similar share of large channels; the second
   rotation then smooths within each block again.
The calibration tensor is the layer input averaged over the calibration windows, position by position (the
released code's choice: one (T, n) tensor; outlier channels are shared across samples, so the mean keeps them).
Block size: 128 in the paper; a width it does not divide (576) uses its largest divisor ≤ 128 (96), as the
rotation must tile the channels exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from slimlm.transforms.blockfit import clamp_rows, fake_quant_weight, fit_block_, ste_fake_quant
from slimlm.transforms.hadamard import random_orthogonal
from slimlm.transforms.ops import Op

BLOCK = 128
MAX_STEPS = 256


def block_size(n: int, largest: int = BLOCK) -> int:
    return max(d for d in range(1, min(n, largest) + 1) if n % d == 0)


def spreading_rotation(b: int, outlier: int, seed: int) -> torch.Tensor:
    """(b, b) orthogonal float64 whose row ``outlier`` is (1/√b)·1: x -> x R moves all of an outlier in coordinate
    ``outlier`` evenly onto every coordinate. A Householder reflection e_outlier -> u, preceded by a seeded random
    rotation of the complement of e_outlier (as DuQuant's ``get_rot`` adds a fresh random part each step)."""
    u = torch.full((b,), b ** -0.5, dtype=torch.float64)
    e = torch.zeros(b, dtype=torch.float64)
    e[outlier] = 1.0
    v = e - u
    H = torch.eye(b, dtype=torch.float64) if v.norm() < 1e-12 else \
        torch.eye(b, dtype=torch.float64) - 2 * torch.outer(v, v) / v.dot(v)
    G = torch.eye(b, dtype=torch.float64)
    rest = [i for i in range(b) if i != outlier]
    if rest:
        G[torch.tensor(rest)[:, None], torch.tensor(rest)] = random_orthogonal(b - 1, seed, torch.float64)
    return G @ H


def _peak(x: torch.Tensor) -> float:
    return float(x.max() - x.min())


def greedy_rotation(x: torch.Tensor, b: int, steps: int = MAX_STEPS, seed: int = 0) -> torch.Tensor:
    """R (b, b) float64 orthogonal such that x (I ⊗ R) has a small peak range: up to ``steps`` greedy rotations
    around the current largest-magnitude entry's coordinate; the best prefix (identity if none helps)."""
    y = x.reshape(-1, b).float()  # the search in float32 (fast); the product R in float64
    R = torch.eye(b, dtype=torch.float64)
    best, best_R = _peak(y), R
    for step in range(steps):
        flat = int(y.abs().argmax())
        rot = spreading_rotation(b, flat % b, seed + step)
        y, R = y @ rot.float(), R @ rot
        if _peak(y) < best:
            best, best_R = _peak(y), R
    return best_R


def zigzag_permutation(channel_max: torch.Tensor, b: int) -> torch.Tensor:
    """Index vector idx (n,) such that x[..., idx] puts the channels ranked by ``channel_max`` (descending) into
    the n/b blocks in zigzag order, each block's channels in descending order."""
    n = channel_max.numel()
    K = n // b
    ranked = torch.argsort(channel_max, descending=True, stable=True).tolist()
    buckets = [[] for _ in range(K)]
    for r, channel in enumerate(ranked):
        turn, pos = divmod(r, K)
        buckets[pos if turn % 2 == 0 else K - 1 - pos].append(channel)
    return torch.tensor([c for bucket in buckets for c in bucket], dtype=torch.long)


def dual_transform(x: torch.Tensor, steps: int = MAX_STEPS, seed: int = 0) -> list[Op]:
    """DuQuant's R̂₁ P R̂₂ for inputs like ``x`` (T, n), as online ops (blockrot, perm, blockrot)."""
    b = block_size(x.shape[-1])
    x = x.to(torch.float64)
    R1 = greedy_rotation(x, b, steps, seed)
    x1 = (x.unflatten(-1, (-1, b)) @ R1).flatten(-2)
    idx = zigzag_permutation(x1.abs().amax(0), b)
    R2 = greedy_rotation(x1[:, idx], b, steps, seed + steps)
    return [Op("blockrot", (R1.float(),)), Op("perm", (idx,)), Op("blockrot", (R2.float(),))]


LWC_EPOCHS, LWC_LR, LWC_INIT = 20, 1e-2, 4.0


def fit_lwc_(block: nn.Module, grid, abits: int | None, act_symmetric: bool, act_clip: float, inputs, targets,
             call_args: dict, epochs: int = LWC_EPOCHS, lr: float = LWC_LR) -> tuple[float, float]:
    """DuQuant+LWC (OmniQuant's learnable weight clipping, DuQuant's run_lwc.sh settings): per output channel,
    clip each transformed weight row to [σ(β)·min, σ(γ)·max] (γ = β = 4 at the start), trained with AdamW at
    lr 1e-2, no weight decay, constant rate, one window per step, ``epochs`` (20) epochs, on the MSE between the
    quantized block's output and the full-precision block's output on the same inputs; the activations are
    fake-quantized as at inference. Call it after the block's transforms are in place; the learned ranges are
    baked into the weights. Returns the first and last epoch's mean loss."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    lwc = nn.ParameterDict({n.replace(".", "_"): nn.Parameter(torch.full((m.out_features, 2), LWC_INIT))
                            for n, m in linears.items()})

    def ratios(name):
        r = torch.sigmoid(lwc[name.replace(".", "_")])
        return r[:, :1], r[:, 1:]

    def params():
        return {f"{n}.weight": fake_quant_weight(m.weight, grid, *ratios(n)) for n, m in linears.items()}

    def quantize_input(module, args):
        clip = torch.tensor(act_clip)
        return (ste_fake_quant(args[0], abits, act_symmetric, clip, clip),) + args[1:]

    handles = [m.register_forward_pre_hook(quantize_input) for m in linears.values()] if abits else []
    try:
        losses = fit_block_(block, params, [{"params": list(lwc.values()), "lr": lr}], inputs, targets, call_args,
                            epochs, batch=1, weight_decay=0.0, normalized=False, eta_min_ratio=None)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.copy_(clamp_rows(m.weight, *ratios(n)))
    return losses
