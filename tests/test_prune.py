"""Pruning methods on small random layers, against independent expectations."""
import itertools

import numpy as np
import pytest
import torch

from slimlm.core.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.pruning.masks import nm_mask, nm_permutation, retained_nm_score, topk_mask
from slimlm.pruning.methods import METHODS, get_method
from slimlm.pruning.scores import ria_scores, wanda
from slimlm.pruning.spec import PruneSpec, check_sparsity, parse_pattern


def calib_inputs(n=512, width=64, seed=0):
    """Correlated inputs with a few outlier channels, like real LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width**0.5 + torch.eye(width)
    X = torch.randn(n, width, generator=g) @ mix
    X[:, :3] *= 8.0
    return X


def stats_of(X):
    return LayerStats(X.shape[0], X.square().sum(0), (2.0 / X.shape[0]) * X.T @ X)


def layer(rows=32, cols=64, seed=1):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def output_error(W, Wp, X):
    return ((X @ W.T - X @ Wp.T) ** 2).sum().item()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_topk_mask_row_prunes_exactly_per_row(sparsity):
    scores = torch.rand(16, 40)
    mask = topk_mask(scores, sparsity, "row")
    k = int(40 * sparsity)
    assert ((~mask).sum(1) == k).all()
    for r in range(16):  # every pruned score is <= every kept score of its row
        if 0 < k < 40:
            assert scores[r][~mask[r]].max() <= scores[r][mask[r]].min()


def test_topk_mask_matrix_prunes_exactly_per_matrix():
    scores = torch.rand(16, 40)
    mask = topk_mask(scores, 0.6, "matrix")
    assert (~mask).sum().item() == int(16 * 40 * 0.6)
    assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_keeps_top_n_of_every_group(n, m):
    scores = torch.rand(8, 32)
    mask = nm_mask(scores, n, m)
    groups = mask.view(8, 32 // m, m)
    assert (groups.sum(2) == n).all()
    for r, g in itertools.product(range(8), range(32 // m)):
        s = scores[r, g * m:(g + 1) * m]
        expected = set(torch.argsort(s, descending=True)[:n].tolist())
        assert set(torch.nonzero(mask[r, g * m:(g + 1) * m]).flatten().tolist()) == expected


def test_wanda_scores_equal_formula():
    X, W = calib_inputs(), layer()
    scores = wanda(W, stats_of(X), PruneSpec())
    Xn, Wn = X.double().numpy(), W.double().numpy()
    expected = np.abs(Wn) * np.sqrt((Xn ** 2).sum(0))[None, :]
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-5)


def test_ria_scores_equal_formula():
    X, W = calib_inputs(), layer()
    scores = ria_scores(W, stats_of(X), PruneSpec(ria_alpha=0.5))
    A = np.abs(W.double().numpy())
    norms = np.sqrt((X.double().numpy() ** 2).sum(0))
    expected = np.empty_like(A)
    for i in range(A.shape[0]):
        for j in range(A.shape[1]):
            expected[i, j] = (A[i, j] / A[:, j].sum() + A[i, j] / A[i, :].sum()) * norms[j] ** 0.5
    np.testing.assert_allclose(scores.double().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_methods_reach_exact_structure(method, pattern):
    X, W = calib_inputs(), layer()
    new, mask, _ = METHODS[method].fn(W, stats_of(X), 0.5, PruneSpec(nm=pattern))
    assert (new[~mask] == 0).all()
    if pattern:
        assert ((new != 0).view(32, -1, 4).sum(2) <= 2).all()
        assert (mask.view(32, -1, 4).sum(2) == 2).all()
    else:
        assert (~mask).sum().item() == W.numel() // 2
    if method == "wanda" and pattern is None:
        assert ((~mask).sum(1) == 32).all()  # per output row


@pytest.mark.parametrize("pattern,sparsity", [(None, 0.5), (None, 0.7), ((2, 4), 0.5)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern, sparsity):
    X, W = calib_inputs(), layer(rows=48, cols=64)
    stats, spec = stats_of(X), PruneSpec(nm=pattern)
    errors = {name: output_error(W, METHODS[name].fn(W, stats, sparsity, spec)[0], X)
              for name in ("sparsegpt", "wanda", "magnitude")}
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"]


def test_sparsegpt_keeps_pruned_weights_zero_and_updates_kept_ones():
    X, W = calib_inputs(), layer()
    new, mask, _ = METHODS["sparsegpt"].fn(W, stats_of(X), 0.5, PruneSpec())
    assert (new[~mask] == 0).all()
    assert not torch.allclose(new[mask], W[mask])  # the OBS update moved the survivors


def test_permutation_never_lowers_retained_ria_score():
    for seed in range(5):
        scores = ria_scores(layer(seed=seed), stats_of(calib_inputs(seed=seed)), PruneSpec())
        perm = nm_permutation(scores, 2, 4)
        assert sorted(perm.tolist()) == list(range(64))
        assert retained_nm_score(scores[:, perm], 2, 4) >= retained_nm_score(scores, 2, 4)


def test_permutation_separates_competing_heavy_channels():
    scores = torch.rand(16, 32) * 0.1
    scores[:, :4] += 10.0  # four heavy channels in one group of 4 compete for its 2 slots
    perm = nm_permutation(scores, 2, 4)
    assert retained_nm_score(scores[:, perm], 2, 4) > retained_nm_score(scores, 2, 4) + 16 * 10
    spec = PruneSpec(nm=(2, 4), permute=True)
    new, mask, perm = METHODS["ria"].fn(layer(16, 32), stats_of(calib_inputs(width=32)), 0.5, spec)
    assert (mask[:, perm].view(16, 8, 4).sum(2) == 2).all()  # exact 2:4 in the permuted order


def test_magnitude_is_per_matrix_and_data_free():
    W = layer()
    new, mask, _ = METHODS["magnitude"].fn(W, None, 0.5, PruneSpec())
    assert W.abs()[~mask].max() <= W.abs()[mask].min()
    assert not METHODS["magnitude"].needs_data


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_patterns_rejected(bad):
    with pytest.raises(SlimlmError):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_rejected(bad):
    with pytest.raises(SlimlmError):
        check_sparsity(bad)


def test_unknown_method_and_group_rejected():
    with pytest.raises(SlimlmError, match="unknown pruning method 'obc'"):
        get_method("obc")
    with pytest.raises(SlimlmError):
        PruneSpec(group="column")
    with pytest.raises(SlimlmError, match="multiple of 4"):
        nm_mask(torch.rand(4, 10), 2, 4)
