"""Weight-spectrum and outlier metrics against independent computations and synthetic power laws."""

import math

import numpy as np
import pytest
import torch

from slimlm.analysis.activations import owl_outlier_ratio
from slimlm.analysis.spectra import batched_esd, esd, hill_alpha, spectral_entropy, weight_metrics, weight_metrics_many
from slimlm.pruning.scores import wanda_scores


def pareto(n: int, alpha: float, seed: int) -> torch.Tensor:
    """n draws with density ∝ λ^-alpha on [1, ∞) (Pareto shape alpha − 1), by inverse-CDF sampling."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return u.pow(-1 / (alpha - 1))


def matrix_with_esd(lam: torch.Tensor, cols: int, seed: int) -> torch.Tensor:
    """W = U diag(√λ) Vᵀ with random orthonormal U (r×r), V (cols×r): the ESD of W is exactly λ."""
    g = torch.Generator().manual_seed(seed)
    r = lam.numel()
    U = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(lam.sqrt()) @ V.T


def tolerance(fit) -> float:
    """4 standard errors of the MLE, (α−1)/√n (Clauset Eq. 3.2), plus its bias (α−1)/(n−1) at fixed x_min."""
    return 4 * (fit.alpha - 1) / math.sqrt(fit.n_tail) + (fit.alpha - 1) / (fit.n_tail - 1)


def test_esd_is_ascending_squared_singular_values():
    W = torch.randn(40, 70, generator=torch.Generator().manual_seed(0))
    expected = np.sort(np.linalg.svd(W.double().numpy(), compute_uv=False) ** 2)
    got = esd(W)
    assert got.dtype == torch.float64 and got.shape == (40,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(esd(W.T).numpy(), expected, rtol=1e-10)


def test_batched_esd_equals_per_matrix_esd():
    g = torch.Generator().manual_seed(1)
    shapes = [(30, 20), (20, 30), (30, 20), (12, 12), (20, 30), (5, 40)]
    weights = [torch.randn(s, generator=g) for s in shapes]
    for W, eigs in zip(weights, batched_esd(weights)):
        torch.testing.assert_close(eigs, esd(W), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
def test_gram_esd_equals_svdvals_path(shape):
    """esd's float64 Gram + eigvalsh against the squared float64 singular values of the same float32
    matrix, on a spectrum spanning 8 decades of λ. Stated tolerance: every eigenvalue within 1e-12·λ_max (EIG_RTOL,
    below which eigenvalues are discarded) and those ≥ 1e-4·λ_max within 1e-9 relative; also batched."""
    r = min(shape)
    W = matrix_with_esd(torch.logspace(-8, 0, r, dtype=torch.float64), cols=max(shape), seed=sum(shape))
    W = (W if shape[0] == r else W.T).float()
    assert W.shape == shape
    ref = torch.linalg.svdvals(W.double()).square().flip(0)
    for got in (esd(W), esd(torch.stack([W, 2 * W]))[0], batched_esd([W.T, W])[1]):
        assert got.dtype == torch.float64 and got.shape == (r,)
        assert ((got - ref).abs() <= 1e-12 * ref[-1]).all()
        big = ref >= 1e-4 * ref[-1]
        torch.testing.assert_close(got[big], ref[big], rtol=1e-9, atol=0)


def fingered_esd(seed: int = 1) -> torch.Tensor:
    """A bulk on (0.05, 0.95), a Pareto(α=3) tail from 1 and four "fingers" near 40: data on which the KS form
    matters (Clauset's two-sided supremum picks x_min ≈ 0.55 here, the references' one-sided form 1.27)."""
    g = torch.Generator().manual_seed(seed)
    bulk = 0.05 + 0.9 * torch.rand(300, generator=g, dtype=torch.float64)
    fingers = torch.tensor([40.0, 41.0, 43.0, 44.0], dtype=torch.float64)
    return torch.cat([bulk, pareto(60, 3.0, seed + 10), fingers]).sort().values


def reference_scan(lam: np.ndarray, count: int) -> tuple[float, float, float]:
    """WeightWatcher's WWFit / AlphaPruning's esd_utils scan as a plain loop over the first ``count`` candidates:
    α_k = 1 + n/Σ ln(λ_i/λ_k), D_k = max_j |1 − (λ_{k+j}/λ_k)^(1−α_k) − j/n|; returns (D, α, x_min) at min D."""
    best = (math.inf, math.nan, math.nan)
    for k in range(count):
        tail, n = lam[k:], len(lam) - k
        a = 1 + n / np.log(tail / lam[k]).sum()
        D = np.abs(1 - (tail / lam[k]) ** (1 - a) - np.arange(n) / n).max()
        best = min(best, (D, a, lam[k]))
    return best


@pytest.mark.parametrize("rule", ["peak", "all"])
def test_hill_alpha_equals_the_references_loop(rule, monkeypatch):
    import slimlm.analysis.spectra

    monkeypatch.setattr(slimlm.analysis.spectra, "KS_ELEMS", 20_000)  # 54 candidates per block: the block split is used
    lam = fingered_esd().numpy()
    counts, edges = np.histogram(np.log10(lam), bins=100)
    peak = min(int((lam <= 1.5 * 10 ** edges[np.argmax(counts)]).sum()), len(lam) - 1)
    D, alpha, xmin = reference_scan(lam, peak if rule == "peak" else len(lam) - 1)
    fit = hill_alpha(torch.from_numpy(lam), rule)
    assert (fit.alpha, fit.ks, fit.xmin) == pytest.approx((alpha, D, xmin), rel=1e-10)
    assert fit.n_tail == int((lam >= xmin).sum())


def test_alpha_mle_equals_weightwatcher_fit():
    from weightwatcher import WW_powerlaw as ww  # in the test extra: this check runs wherever the tests do
    for seed in range(3):
        lam = fingered_esd(seed)
        ref = ww.WWFit(lam.numpy())  # WeightWatcher's default power-law fit (pl_package="ww")
        fit = weight_metrics(matrix_with_esd(lam, cols=400, seed=seed))
        assert (fit["alpha_mle"], fit["xmin_mle"]) == pytest.approx((ref.alpha, ref.xmin), rel=1e-8)


@pytest.mark.parametrize("rule", ["peak", "all"])
@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_hill_alpha_recovers_pareto_exponent(alpha, rule):
    fit = hill_alpha(pareto(600, alpha, seed=int(alpha)), rule)
    assert fit.n_tail >= 100  # a pure power law should be fitted on a large part of the sample
    assert abs(fit.alpha - alpha) <= tolerance(fit)


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_weight_metrics_recover_alpha_of_a_matrix_with_pareto_esd(alpha):
    lam = pareto(300, alpha, seed=10 + int(alpha))
    W = matrix_with_esd(lam, cols=450, seed=int(alpha))
    np.testing.assert_allclose(esd(W).numpy(), np.sort(lam.numpy()), rtol=1e-8)
    m = weight_metrics(W)
    peak, every = hill_alpha(lam, "peak"), hill_alpha(lam, "all")
    assert (m["alpha"], m["xmin"], m["n_tail"]) == pytest.approx((peak.alpha, peak.xmin, peak.n_tail), rel=1e-6)
    assert m["alpha_mle"] == pytest.approx(every.alpha, rel=1e-6)
    assert abs(peak.alpha - alpha) <= tolerance(peak)
    assert abs(every.alpha - alpha) <= tolerance(every)


def test_all_candidates_find_xmin_above_a_bulk():
    """Bulk below 1 plus a Pareto tail from 1: the minimum-KS x_min should sit at the start of the tail."""
    g = torch.Generator().manual_seed(3)
    bulk = 0.05 + 0.9 * torch.rand(300, generator=g, dtype=torch.float64)
    fit = hill_alpha(torch.cat([bulk, pareto(400, 3.0, seed=4)]), "all")
    assert 0.9 <= fit.xmin <= 2.0
    assert abs(fit.alpha - 3.0) <= tolerance(fit)


def test_peak_rule_keeps_xmin_near_the_histogram_peak():
    lam = torch.cat([torch.linspace(0.5, 1.5, 400, dtype=torch.float64), pareto(200, 2.5, seed=5) * 2])
    logs = np.log10(lam.numpy())
    counts, edges = np.histogram(logs, bins=100)
    bound = 1.5 * 10 ** edges[np.argmax(counts)]
    assert hill_alpha(lam, "peak").xmin <= bound < hill_alpha(lam, "all").xmin  # the rule changes the answer here


def test_degenerate_inputs():
    assert math.isnan(hill_alpha(torch.ones(50)).alpha)
    with pytest.raises(ValueError):
        hill_alpha(pareto(50, 2.0, 0), "median")
    with pytest.raises(ValueError, match="all-zero"):
        weight_metrics(torch.zeros(8, 8))


def test_weight_metrics_match_direct_linalg():
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 0.1
    m = weight_metrics(W)
    spec = torch.linalg.matrix_norm(W, ord=2).item()
    fro = torch.linalg.matrix_norm(W, ord="fro").item()
    assert m["spectral_norm"] == pytest.approx(spec, rel=1e-10)
    assert m["frobenius_norm"] == pytest.approx(fro, rel=1e-10)
    assert m["stable_rank"] == pytest.approx(fro**2 / spec**2, rel=1e-10)
    assert m["log_norm"] == pytest.approx(math.log10(fro**2), rel=1e-10)
    assert m["alpha_hat"] == pytest.approx(m["alpha"] * math.log10(spec**2), rel=1e-10)
    s2 = np.linalg.svd(W.numpy(), compute_uv=False) ** 2
    p = s2 / s2.sum()
    assert m["entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(48), rel=1e-10)
    assert m["num_eigs"] == 48
    assert all(isinstance(v, (int, float)) for v in m.values())


def test_spectral_entropy_extremes():
    Q = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0]
    assert spectral_entropy(esd(Q)) == pytest.approx(1.0, abs=1e-12)  # flat spectrum
    rank1 = torch.outer(torch.arange(1.0, 21.0), torch.arange(1.0, 11.0))
    assert spectral_entropy(esd(rank1)) == 0.0


def test_weight_metrics_many_equals_single():
    g = torch.Generator().manual_seed(8)
    named = {name: torch.randn(shape, generator=g) for name, shape in [("a", (30, 60)), ("b", (60, 30)), ("c", (30, 60))]}
    many = weight_metrics_many(named)
    for name, W in named.items():
        single = weight_metrics(W)
        for key in single:
            assert many[name][key] == pytest.approx(single[key], rel=1e-9), (name, key)


def test_wanda_scores_and_owl_ratio_against_loops():
    g = torch.Generator().manual_seed(9)
    W = torch.randn(6, 10, generator=g)
    W[2, 3] = 25.0  # a few planted outliers
    W[4, 7] = -30.0
    sqnorm = torch.rand(10, generator=g) * 4
    S = wanda_scores(W, sqnorm)
    for i in range(6):
        for j in range(10):
            assert S[i, j].item() == pytest.approx(abs(W[i, j].item()) * math.sqrt(sqnorm[j].item()), rel=1e-6)
    for m in [1.0, 3.0, 5.0]:
        a = S.double().numpy().ravel()
        expected = sum(1 for v in a if v > m * a.mean()) / a.size
        assert owl_outlier_ratio(S, m) == expected
    W2 = torch.randn(4, 10, generator=g)
    S2 = wanda_scores(W2, sqnorm)
    assert owl_outlier_ratio([S, S2], 3.0) == owl_outlier_ratio(torch.cat([S.flatten(), S2.flatten()]), 3.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_esd_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(10)
    weights = [torch.randn(s, generator=g) for s in [(64, 96), (96, 64), (64, 96), (40, 40)]]
    for W, on_cuda, moved in zip(weights, batched_esd([W.cuda() for W in weights]), batched_esd(weights, "cuda")):
        assert on_cuda.is_cuda and moved.is_cuda
        torch.testing.assert_close(on_cuda.cpu(), esd(W), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(moved.cpu(), esd(W), rtol=1e-8, atol=1e-10)
    named = dict(zip("abcd", weights))
    on_gpu, on_cpu = weight_metrics_many(named, device="cuda"), weight_metrics_many(named)
    for name in named:
        for key in on_cpu[name]:
            assert on_gpu[name][key] == pytest.approx(on_cpu[name][key], rel=1e-8), (name, key)


def test_pruning_error_table_matches_direct_output_error():
    from slimlm.analysis.sensitivity import pruning_error_table

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
    W = torch.randn(16, 32, generator=g)
    sqnorm, H = X.square().sum(0), 2 * X.T @ X / X.shape[0]
    table = pruning_error_table(W, sqnorm, H, levels=(0.0, 0.25, 0.5))
    assert table[0.0] == 0.0
    for s in (0.25, 0.5):
        k = int(32 * s)
        scores = W.abs() * sqnorm.sqrt()
        mask = torch.ones_like(W, dtype=torch.bool)
        for r in range(16):  # reference: a plain per-row loop and the explicit inputs
            mask[r, torch.argsort(scores[r])[:k]] = False
        direct = ((X @ W.T - X @ (W * mask).T) ** 2).sum() / ((X @ W.T) ** 2).sum()
        assert abs(table[s] - direct.item()) < 1e-4 * max(1.0, direct.item())
    assert table[0.25] < table[0.5]


def test_pruning_error_table_equals_one_dense_product_per_level():
    """The level-by-level update gives each level's tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) formed on its own, to float32
    rounding, with ties in the scores (a coarse grid of weights) broken the same way; levels in any order."""
    from slimlm.analysis.sensitivity import ERROR_LEVELS, pruning_error_table

    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 48, generator=g) * torch.rand(48, generator=g) * 3
    W = (torch.randn(24, 48, generator=g) * 4).round() / 4  # many equal |W_ij| in a row: ties
    sqnorm, H = X.square().sum(0), 2 * X.T @ X / X.shape[0]
    sqnorm[::2] = sqnorm[0]  # equal channel norms too, so equal scores in every row
    levels = ERROR_LEVELS[::-1]
    table = pruning_error_table(W, sqnorm, H, levels)
    assert list(table) == list(levels)
    order = torch.sort(wanda_scores(W, sqnorm), dim=1, stable=True).indices
    for s in levels:
        k = int(48 * s)
        dW = torch.zeros_like(W).scatter_(1, order[:, :k], W.gather(1, order[:, :k]))
        direct = (((dW @ H) * dW).sum() / ((W @ H) * W).sum()).item()
        assert table[s] == pytest.approx(direct, rel=1e-5, abs=1e-12), s


def test_calibration_metrics_owl_lod_matches_direct_block_computation():
    from slimlm.analysis.activations import calibration_metrics
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs = {}

    def keep(name):
        def hook(module, args, output):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    hooks = [lin.register_forward_hook(keep(n))
             for n, lin in model.named_modules() if isinstance(lin, torch.nn.Linear) and "layers.1." in n]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    records = calibration_metrics(model, ids, owl_m=2.0, error_levels=(0.0, 0.5), batch_size=4, progress=False)
    scores = torch.cat([(dict(model.named_modules())[n].weight.abs() * x.square().sum(0).sqrt()).flatten()
                        for n, x in inputs.items()])
    expected = (scores > 2.0 * scores.mean()).double().mean().item()
    assert abs(records["model.layers.1.mlp.down_proj"]["owl_lod"] - expected) < 1e-9
    assert set(records["model.layers.0.self_attn.q_proj"]["errors"]) == {0.0, 0.5}


def test_fisher_diagonal_and_tables_match_direct_computation():
    from slimlm.analysis.sensitivity import fisher_diagonal, fisher_tables
    from slimlm.core.architectures import linear_fqns
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    fisher, sqnorms = fisher_diagonal(model, ids, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # the requires_grad flags are restored
    name = "model.layers.1.mlp.up_proj"
    lin = dict(model.named_modules())[name]
    expected = torch.zeros_like(lin.weight)
    inputs = []
    hook = lin.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    for w in ids:  # reference: one plain backward per window
        model.zero_grad()
        model(input_ids=w[None], labels=w[None]).loss.backward()
        expected += lin.weight.grad.square() / len(ids)
    hook.remove()
    assert torch.allclose(fisher[name], expected, rtol=1e-4, atol=1e-12)
    assert torch.allclose(sqnorms[name], torch.cat(inputs).reshape(-1, lin.in_features).square().sum(0), rtol=1e-5)
    tables = fisher_tables(model, fisher, sqnorms, levels=(0.0, 0.25, 0.5))
    W, F = lin.weight.detach(), fisher[name]
    scores = W.abs() * sqnorms[name].sqrt()
    for s in (0.0, 0.25, 0.5):
        k = int(W.shape[1] * s)
        pruned = torch.zeros_like(W, dtype=torch.bool)
        for r in range(W.shape[0]):  # Wanda's per-row order, the k lowest scores removed
            pruned[r, torch.argsort(scores[r])[:k]] = True
        direct = (0.5 * F * W.square())[pruned].double().sum().item()
        assert tables[name][s] == pytest.approx(direct, rel=1e-6, abs=1e-30)
    assert set(tables) == set(linear_fqns(model))
    from slimlm.analysis.sensitivity import fisher_bit_tables
    from slimlm.quant.grids import QuantGrid
    from slimlm.quant.rtn import rtn

    bit_tables = fisher_bit_tables(model, fisher, lambda b: QuantGrid(b, group_size=8), (2, 4, 8))
    for b in (2, 4, 8):
        direct = (0.5 * F * (W - rtn(W, QuantGrid(b, group_size=8))).square()).double().sum().item()
        assert bit_tables[name][float(b)] == pytest.approx(direct, rel=1e-6)
    assert bit_tables[name][2.0] > bit_tables[name][4.0] > bit_tables[name][8.0]


def test_fisher_sparsegpt_tables_price_sparsegpt_changes_with_kfac():
    from slimlm.analysis.sensitivity import fisher_diagonal, fisher_sparsegpt_tables
    from slimlm.core.stats import LayerStats
    from slimlm.pruning.sparsegpt import sparsegpt
    from slimlm.pruning.spec import PruneSpec
    from tests.conftest import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    fisher, _ = fisher_diagonal(model, ids, progress=False)
    tables = fisher_sparsegpt_tables(model, ids, fisher, levels=(0.0, 0.5), progress=False)
    name = "model.layers.1.mlp.up_proj"
    lin = dict(model.named_modules())[name]
    inputs = []
    hook = lin.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)  # reference Hessian: a plain forward of the dense model
    hook.remove()
    X = torch.cat(inputs).reshape(-1, lin.in_features).double()
    H = 2 / X.shape[0] * X.T @ X
    W = lin.weight.detach().double()
    pruned = sparsegpt(lin.weight.detach(), LayerStats(X.shape[0], X.square().sum(0).float(), H.float()), 0.5,
                       PruneSpec())[0].double()
    dW = W - pruned
    g = (fisher[name].double() * W.square()).sum(1) / (W.square() @ torch.diag(H))  # OBD-matched row factors
    expected = 0.5 * (g * ((dW @ H) * dW).sum(1)).sum().item()
    assert tables[name][0.0] == 0.0 and (pruned == 0).double().mean() == 0.5
    assert tables[name][0.5] == pytest.approx(expected, rel=1e-3)
