"""The straight-through quantizers and the baked clipping of blockfit, against the grids' own formulas."""
import torch

from slimlm.quant.grids import QuantGrid, fake_quant
from slimlm.transforms.blockfit import clamp_rows, fake_quant_weight, ste_fake_quant


def test_straight_through_quantizer_matches_the_grid_and_passes_gradients():
    x = torch.randn(5, 16, requires_grad=True)
    one = torch.ones(1)
    for symmetric in (True, False):
        expected = fake_quant(x.detach(), QuantGrid(4, symmetric))
        assert torch.allclose(ste_fake_quant(x, 4, symmetric, one, one), expected, atol=1e-6)
    ratio = torch.tensor(0.9, requires_grad=True)
    ste_fake_quant(x, 4, False, ratio, ratio).square().sum().backward()
    assert ratio.grad is not None and ratio.grad != 0 and x.grad.abs().sum() > 0


def test_baked_clipping_gives_the_trained_quantization():
    W = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    hi, lo = torch.full((6, 1), 0.8), torch.full((6, 1), 0.6)
    grid = QuantGrid(3, symmetric=False)
    trained = fake_quant_weight(W, grid, hi, lo)  # what training saw
    baked = clamp_rows(W, hi, lo)
    assert baked.amax(1).le(W.amax(1) * 0.8 + 1e-6).all() and baked.amin(1).ge(W.amin(1) * 0.6 - 1e-6).all()
    assert torch.allclose(fake_quant(baked, grid), trained, atol=1e-6)  # RTN on the clamped weight
    grouped = QuantGrid(4, group_size=8)
    assert torch.allclose(fake_quant_weight(W, grouped, torch.ones(6, 1), torch.ones(6, 1)),
                          fake_quant(W, grouped), atol=1e-6)


def test_partial_last_group_is_quantized_as_the_grid_does():
    """576-wide rows with groups of 128 (the built-in model's default) end in a 64-wide group; a width under one
    group (a tiny model's 64 with groups of 128) is one partial group."""
    for width, group in ((80, 32), (64, 128), (576, 128)):
        W = torch.randn(3, width, generator=torch.Generator().manual_seed(width), requires_grad=True)
        ones = torch.ones(3, 1)
        for symmetric in (True, False):
            grid = QuantGrid(4, symmetric, group)
            assert torch.allclose(fake_quant_weight(W, grid, ones, ones), fake_quant(W.detach(), grid), atol=1e-6)
        fake_quant_weight(W, QuantGrid(4, group_size=group), ones, ones).sum().backward()
        assert W.grad.abs().sum() > 0
