"""Width: remove attention heads (whole KV groups under GQA) and MLP channels, with FLAP's bias compensation.

A unit is one KV group of attention (its key/value head, the query heads sharing it, their o_proj columns) or
one MLP channel (a gate/up row and its down_proj column). Removing a unit removes one slice of the input of
o_proj or down_proj, so every score is a score of those input columns:
  * ``flap``: FLAP's fluctuation metric (An et al. 2024, eq. 6, WIFV): S_j = Var_t(x_tj) · ‖W_:,j‖², the output
    energy the column adds around its mean, which is what is lost once the mean is compensated (below).
  * ``fisher``: slimlm's: the estimated loss increase ½ Σ_i F_ij W_ij² · Var(x_j) / E[x_j²], with F the empirical
    Fisher diagonal of the weight (``analysis.sensitivity.fisher_diagonal``): the column's squared change weighed
    by how much the loss reacts to it, the un-centred Fisher rescaled to the centred change left after
    compensation. Unlike FLAP's metric it is in loss units, so blocks compare without standardising.
Compensation (FLAP eq. 8): the removed columns' mean contribution W_:,removed · E[x_removed] moves into the
layer's bias, so the output is exact for the mean input. Statistics come from one pass of the dense model
(FLAP ranks all blocks together before removing any, so every block is scored on dense activations).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimlm.core.architectures import adapter_for, decoder_blocks
from slimlm.core.engine import compress_blocks
from slimlm.core.stats import LayerStats
from slimlm.errors import SlimlmError, unknown

METHODS = ("flap", "fisher")


@dataclass
class BlockUnits:
    """The removable units of one block: their scores (lower = removed first) and parameter costs."""

    head_scores: torch.Tensor  # (kv groups,)
    channel_scores: torch.Tensor  # (intermediate,)
    head_cost: int  # parameters of one KV group (q, k, v rows and o_proj columns)
    channel_cost: int  # parameters of one MLP channel (gate, up rows and a down_proj column)


def layout(block) -> tuple[int, int, int]:
    """(KV groups, query heads per group, head dim) of a Llama-family block, read from its weight shapes."""
    attn = block.self_attn
    head_dim = attn.head_dim
    groups = attn.k_proj.out_features // head_dim
    return groups, attn.q_proj.out_features // head_dim // groups, head_dim


def unit_costs(block) -> tuple[int, int]:
    groups, per_group, head_dim = layout(block)
    hidden = block.self_attn.q_proj.in_features
    return (2 * per_group + 2) * head_dim * hidden, 3 * hidden


def block_statistics(model, windows: torch.Tensor, device="cpu", batch_size: int | None = None,
                     progress: bool = True) -> dict[str, LayerStats]:
    """Input statistics (channel sums and squares) of every o_proj and down_proj, from one dense pass."""
    prefix = adapter_for(model).blocks
    targets = {f"{prefix}.{i}.{name}" for i in range(len(decoder_blocks(model)))
               for name in ("self_attn.o_proj", "mlp.down_proj")}
    stats: dict[str, LayerStats] = {}

    def record(group, layer_stats):
        for fqn in group:
            stats[fqn] = LayerStats(layer_stats.ntokens, layer_stats.sqnorm.cpu(), total=layer_stats.total.cpu())
        return False

    compress_blocks(model, windows, record, targets, device=device, batch_size=batch_size, progress=progress,
                    sequential=False, results=(stats,))
    return stats


def column_scores(method: str, weight: torch.Tensor, stats: LayerStats, fisher: torch.Tensor | None = None):
    """Per input column of o_proj / down_proj: the method's score (see the module docstring)."""
    W = weight.detach().float()
    if method == "flap":
        return stats.variance * W.square().sum(0)
    if method == "fisher":
        centred = stats.variance / (stats.sqnorm / stats.ntokens).clamp_min(1e-30)
        return 0.5 * (fisher * W.square()).sum(0) * centred
    raise unknown("width method", method, METHODS)


def block_units(model, method: str, stats: dict[str, LayerStats], fisher: dict | None = None) -> list[BlockUnits]:
    prefix, units = adapter_for(model).blocks, []
    for i, block in enumerate(decoder_blocks(model)):
        o, down = f"{prefix}.{i}.self_attn.o_proj", f"{prefix}.{i}.mlp.down_proj"
        heads = column_scores(method, block.self_attn.o_proj.weight, stats[o], fisher and fisher[o])
        channels = column_scores(method, block.mlp.down_proj.weight, stats[down], fisher and fisher[down])
        groups = layout(block)[0]
        units.append(BlockUnits(heads.view(groups, -1).sum(1), channels, *unit_costs(block)))
    return units


def _sliced(linear: nn.Linear, rows=None, cols=None, extra_bias=None) -> nn.Linear:
    """A new linear with the given rows (outputs) and columns (inputs) of ``linear``, plus ``extra_bias``."""
    W = linear.weight.data
    W = W if rows is None else W[rows]
    W = W if cols is None else W[:, cols]
    bias = linear.bias.data if linear.bias is not None else None
    bias = bias if bias is None or rows is None else bias[rows]
    if extra_bias is not None:
        bias = extra_bias.to(W.dtype) + (0 if bias is None else bias)
    new = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=W.dtype, device=W.device)
    new.weight.data.copy_(W)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _compensation(linear: nn.Linear, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed columns' output at their mean input."""
    return linear.weight.data[:, removed].float() @ mean[removed].to(linear.weight.device)


def shrink_block_(block, keep_groups: torch.Tensor, keep_channels: torch.Tensor, attn_mean: torch.Tensor | None,
                  mlp_mean: torch.Tensor | None) -> None:
    """Keep only the given KV groups and MLP channels of a block (indices ascending). With the means of
    o_proj's and down_proj's inputs, the removed columns' mean contribution goes into their biases."""
    groups, per_group, head_dim = layout(block)
    if not (0 < len(keep_groups) <= groups and 0 < len(keep_channels) <= block.mlp.down_proj.in_features):
        raise SlimlmError("a block keeps at least one attention head group and one MLP channel")
    attn, mlp = block.self_attn, block.mlp
    kv_rows = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q_cols = (keep_groups[:, None] * per_group * head_dim + torch.arange(per_group * head_dim)).flatten()
    removed_q = _complement(q_cols, attn.o_proj.in_features)
    removed_ch = _complement(keep_channels, mlp.down_proj.in_features)
    o_bias = None if attn_mean is None else _compensation(attn.o_proj, removed_q, attn_mean)
    down_bias = None if mlp_mean is None else _compensation(mlp.down_proj, removed_ch, mlp_mean)
    attn.q_proj = _sliced(attn.q_proj, rows=q_cols)
    attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
    attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
    attn.o_proj = _sliced(attn.o_proj, cols=q_cols, extra_bias=o_bias)
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=keep_channels)
    mlp.up_proj = _sliced(mlp.up_proj, rows=keep_channels)
    mlp.down_proj = _sliced(mlp.down_proj, cols=keep_channels, extra_bias=down_bias)


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def lowest_kept(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices kept (ascending) after removing the ``remove`` lowest scores (ties: the earlier index goes)."""
    order = torch.sort(scores, stable=True).indices
    return order[remove:].sort().values
