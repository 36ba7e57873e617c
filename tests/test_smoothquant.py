"""SmoothQuant's scales against Eq. 4, and the balance they strike."""
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.transforms.smoothquant import smoothing_scales


def test_scales_follow_the_definition_and_balance_the_ranges():
    g = torch.Generator().manual_seed(0)
    x_max = torch.rand(8, generator=g) * 50 + 0.1
    W1, W2 = torch.randn(4, 8, generator=g), torch.randn(3, 8, generator=g)
    s = smoothing_scales(x_max, [W1, W2], 0.5)
    w_max = torch.cat([W1, W2]).abs().amax(0)
    assert torch.allclose(s, x_max.sqrt() / w_max.sqrt())
    assert torch.allclose(x_max / s, w_max * s)  # α = 0.5: both sides end with the same per-channel max
    assert torch.allclose(smoothing_scales(x_max, [W1], 1.0), x_max)  # all difficulty into the weights
    with pytest.raises(SlimlmError, match="alpha"):
        smoothing_scales(x_max, [W1], 1.2)
