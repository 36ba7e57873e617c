"""DuQuant's pieces against their definitions: the spreading rotation, the greedy search, the zigzag deal."""
import torch

from slimlm.transforms.duquant import (block_size, dual_transform, greedy_rotation, spreading_rotation,
                                  zigzag_permutation)
from slimlm.transforms.ops import apply_ops, transform_weight


def test_spreading_rotation_is_orthogonal_and_spreads_its_coordinate_evenly():
    R = spreading_rotation(8, 5, seed=3)
    assert torch.allclose(R @ R.T, torch.eye(8, dtype=torch.float64), atol=1e-12)
    e = torch.zeros(8, dtype=torch.float64)
    e[5] = 4.0
    assert torch.allclose(e @ R, torch.full((8,), 4.0 / 8 ** 0.5, dtype=torch.float64), atol=1e-12)


def planted(T=64, n=32, channel=6, size=40.0):
    x = torch.randn(T, n, generator=torch.Generator().manual_seed(0))
    x[:, channel] += size
    return x


def test_greedy_rotation_lowers_the_peak_and_keeps_the_best_prefix():
    x = planted()
    peak = lambda y: float(y.max() - y.min())  # noqa: E731
    R = greedy_rotation(x, 8, steps=16)
    rotated = (x.double().unflatten(-1, (-1, 8)) @ R).flatten(-2)
    assert torch.allclose(R @ R.T, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert peak(rotated) < 0.5 * peak(x)
    assert torch.equal(greedy_rotation(x, 8, steps=0), torch.eye(8, dtype=torch.float64))
    assert peak(rotated) <= peak((x.double().unflatten(-1, (-1, 8)) @ greedy_rotation(x, 8, steps=1)).flatten(-2))


def test_zigzag_deals_ranked_channels_back_and_forth():
    channel_max = torch.tensor([5.0, 9, 1, 7, 3, 8, 2, 6])  # ranks: 1, 5, 7, 3, 0, 4, 6, 2 by channel
    idx = zigzag_permutation(channel_max, 2)  # K = 4 blocks: ranks go to blocks 0,1,2,3,3,2,1,0
    ranked = torch.argsort(channel_max, descending=True).tolist()  # channel of rank r
    expected = [ranked[0], ranked[7], ranked[1], ranked[6], ranked[2], ranked[5], ranked[3], ranked[4]]
    assert idx.tolist() == expected
    blocks = channel_max[idx].view(4, 2)
    assert torch.equal(blocks.amax(1).sort(descending=True).values, channel_max.sort(descending=True).values[:4])
    ranks = torch.empty(8)
    ranks[torch.tensor(ranked)] = torch.arange(8.0)
    assert torch.unique(ranks[idx].view(4, 2).sum(1)).numel() == 1  # every block's rank sum is equal


def test_dual_transform_keeps_the_product_and_flattens_a_planted_outlier():
    x = planted()
    ops = dual_transform(x, steps=32)
    W = torch.randn(10, 32)
    assert torch.allclose(apply_ops(x, ops) @ transform_weight(W, ops).T, x @ W.T, atol=1e-3)
    assert apply_ops(x, ops).abs().max() < 0.5 * x.abs().max()


def test_block_size_divides_the_width():
    assert (block_size(4096), block_size(576), block_size(1536), block_size(64)) == (128, 96, 128, 64)


def test_learned_clipping_lowers_the_quantized_block_error():
    from slimlm.transforms.duquant import fit_lwc_
    from slimlm.quant.grids import QuantGrid
    from tests.test_flatquant import block_data
    from tests.conftest import tiny_llama

    block, x, y, call_args, _ = block_data(tiny_llama())
    before = {n: p.clone() for n, p in block.named_parameters()}
    first, last = fit_lwc_(block, QuantGrid(3), 4, False, 0.9, x, y, call_args, epochs=4)
    assert last < first
    changed = [n for n, p in block.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith("proj.weight") for n in changed)  # only the clipped weights move
