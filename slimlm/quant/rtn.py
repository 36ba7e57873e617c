"""Round-to-nearest weight quantization."""
import torch

from slimlm.quant.grids import QuantGrid, fake_quant


def rtn(W: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Round-to-nearest weight quantization: the data-free baseline GPTQ is compared against."""
    return fake_quant(W, grid)
