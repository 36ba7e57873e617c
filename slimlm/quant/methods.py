"""The weight quantizers by name. A quantizer is ``fn(weights, stats, grid, options) -> (quantized, losses)``:
``weights`` the (out, in) weights of the linears that read one input (q/k/v, gate/up: they share ``stats``, the
``core.stats.LayerStats`` of that input, None for data-free quantizers), the same grid for all of them; it returns
their quantized weights and, per weight, its loss (or None). A new quantizer is one module in this package plus one
entry in ``QUANTIZERS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from slimlm.core.stats import LayerStats
from slimlm.errors import lookup
from slimlm.quant.gptq import gptq
from slimlm.quant.grids import QuantGrid
from slimlm.quant.rtn import rtn


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ's settings: lazy-update block size, dampening (fraction of the mean Hessian diagonal), act-order."""

    blocksize: int = 128
    damp: float = 0.01
    act_order: bool = False


def rtn_weights(weights: list[torch.Tensor], stats: LayerStats | None, grid: QuantGrid, options: GPTQOptions):
    return [rtn(W, grid) for W in weights], [None] * len(weights)


def gptq_weights(weights: list[torch.Tensor], stats: LayerStats, grid: QuantGrid, options: GPTQOptions):
    """One GPTQ sweep over the stacked rows of linears that read one input (rows are independent given H), split
    back per linear with each one's summed row losses."""
    Q, row_loss = gptq(torch.cat(weights), stats.hessian, grid, options.blocksize, options.damp, options.act_order)
    rows = [W.shape[0] for W in weights]
    return list(Q.split(rows)), [loss.sum().item() for loss in row_loss.split(rows)]


@dataclass(frozen=True)
class Quantizer:
    fn: Callable
    needs_data: bool  # calibration pass with layer Hessians


QUANTIZERS = {"rtn": Quantizer(rtn_weights, needs_data=False), "gptq": Quantizer(gptq_weights, needs_data=True)}


def get_quantizer(name: str) -> Quantizer:
    return lookup(QUANTIZERS, name, "quantization method")
