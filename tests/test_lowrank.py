"""Low-rank factorization: exact factors, SVD-LLM's loss identity, WeLore's threshold, the rank allocator, models."""
import pytest
import torch

from slimlm.core.architectures import linear_fqns
from slimlm.core.structure import describe, rebuild_
from slimlm.errors import SlimlmError
from slimlm.structured.lowrank import (LowRankLinear, collect_hessians, factorize_, lowrank_params,
                                       max_useful_rank, normalized_spectrum, ranks_for_budget,
                                       saves_parameters, singular_values, svd_factors, svdllm_factors,
                                       truncation_losses, uniform_ranks, welore_ranks, welore_threshold,
                                       whitened_singular_values)
from tests.conftest import tiny_llama


def correlated_inputs(n=256, width=32, seed=0):
    """(n, width) inputs with very unequal, mixed channel scales, so that whitening matters."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, width, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=torch.float64))[0]
    return torch.randn(n, width, generator=g, dtype=torch.float64) * scales @ mix


def with_spectrum(sigma, out, in_, seed=0):
    """An (out, in) float64 matrix with singular values ``sigma`` (len = min(out, in))."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, len(sigma), generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_, len(sigma), generator=g, dtype=torch.float64))[0]
    return U * sigma @ V.T


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["svdllm", "svd"])
def test_full_rank_factors_reproduce_the_weight(method):
    torch.manual_seed(0)
    W = torch.randn(24, 32)
    H = correlated_inputs().T @ correlated_inputs()
    first, second = svdllm_factors(W, H, 24) if method == "svdllm" else svd_factors(W, 24)
    assert first.shape == (24, 32) and second.shape == (24, 24) and first.dtype == W.dtype
    assert relative(second @ first, W) < 1e-5


def test_svdllm_output_loss_is_the_whitened_tail_and_beats_plain_svd():
    torch.manual_seed(0)
    X = correlated_inputs()
    W, H, k = torch.randn(24, 32, dtype=torch.float64), X.T @ X, 8
    first, second = svdllm_factors(W, H, k)
    loss = (X @ (W - second @ first).T).square().sum()
    tail = whitened_singular_values(W, H)[k:].square().sum()
    assert abs(float(loss / tail) - 1) < 1e-6
    assert float(truncation_losses(whitened_singular_values(W, H))[k]) == pytest.approx(float(tail), rel=1e-12)
    plain_first, plain_second = svd_factors(W, k)
    plain_loss = (X @ (W - plain_second @ plain_first).T).square().sum()
    assert loss < 0.5 * plain_loss  # strictly better by far on these skewed inputs (≤ holds always)


def test_svdllm_factors_do_not_depend_on_the_hessian_scale_and_survive_a_singular_one():
    torch.manual_seed(0)
    W, X = torch.randn(16, 32, dtype=torch.float64), correlated_inputs(n=20)  # 20 tokens < 32 inputs: singular
    first, second = svdllm_factors(W, X.T @ X, 6)
    scaled_first, scaled_second = svdllm_factors(W, 2 / 20 * X.T @ X, 6)
    assert torch.isfinite(first).all()
    assert relative(scaled_second @ scaled_first, second @ first) < 1e-6


def test_saves_parameters_boundary():
    assert saves_parameters(64, 64, 31) and not saves_parameters(64, 64, 32)  # 32·128 = 64·64
    assert max_useful_rank(64, 64) == 31 and max_useful_rank(128, 64) == 42  # 42·192 < 8192 ≤ 43·192
    assert max_useful_rank(1, 100) == 0
    for out, in_ in [(64, 64), (128, 64), (7, 300), (1, 100)]:
        k = max_useful_rank(out, in_)
        assert (k == 0 or saves_parameters(out, in_, k)) and not saves_parameters(out, in_, k + 1)


def spectra_set():
    """Matrices of several shapes and decay rates, some nearly flat (those should stay dense)."""
    shapes = {f"m{i}": shape for i, shape in enumerate([(48, 32), (32, 32), (64, 32), (32, 96), (40, 40), (32, 56)])}
    decays = [0.05, 0.1, 0.3, 0.6, 1.0, 2.0]
    sigmas = {name: torch.arange(1, min(shape) + 1, dtype=torch.float64) ** -decay
              for (name, shape), decay in zip(shapes.items(), decays)}
    return sigmas, shapes


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_welore_threshold_hits_the_parameter_target(target):
    sigmas, shapes = spectra_set()
    original = sum(o * i for o, i in shapes.values())
    tau = welore_threshold(sigmas, shapes, target)
    achieved = lowrank_params(welore_ranks(sigmas, shapes, tau), shapes)
    assert achieved <= target * original
    assert achieved >= (target - 0.05) * original
    lower = torch.cat([normalized_spectrum(s) for s in sigmas.values()])
    lower = float(lower[lower < tau].max())  # the next candidate down already breaks the target: τ is the least
    assert lowrank_params(welore_ranks(sigmas, shapes, lower), shapes) > target * original


def test_welore_keeps_matrices_dense_when_their_rank_would_not_save():
    sigmas, shapes = spectra_set()
    ranks = welore_ranks(sigmas, shapes, 0.01)
    for name, rank in ranks.items():
        kept = int((normalized_spectrum(sigmas[name]) >= 0.01).sum())
        assert (rank is None) == (not saves_parameters(*shapes[name], kept))
        assert rank is None or rank == kept
    assert ranks["m0"] is None and ranks["m5"] == 9  # flat: nothing to drop; σ_i = i⁻²: i ≤ 9 above 1%
    with pytest.raises(SlimlmError, match="cannot reach"):
        welore_threshold(sigmas, shapes, 0.01)


def test_ranks_for_budget_respects_the_budget_and_follows_heavy_tails():
    shapes = {"flat": (64, 64), "steep": (64, 64)}
    losses = {"flat": truncation_losses(torch.ones(64)), "steep": truncation_losses(0.5 ** torch.arange(64.0))}
    ranks = ranks_for_budget(losses, shapes, 0.3)
    assert lowrank_params(ranks, shapes) <= 0.3 * 2 * 64 * 64
    assert ranks["flat"] > 4 * ranks["steep"]
    assert lowrank_params(ranks, shapes) > 0.3 * 2 * 64 * 64 - 128  # no whole rank left unspent


def test_ranks_for_budget_minimises_the_loss_on_random_tables():
    sigmas, shapes = spectra_set()
    original = sum(o * i for o, i in shapes.values())
    losses = {name: truncation_losses(s) for name, s in sigmas.items()}
    for target in (0.2, 0.4, 0.6, 0.9):
        ranks = ranks_for_budget(losses, shapes, target)
        assert lowrank_params(ranks, shapes) <= target * original
        assert all(r is None or saves_parameters(*shapes[n], r) for n, r in ranks.items())
        total = sum(0.0 if r is None else float(losses[n][r]) for n, r in ranks.items())
        uniform = uniform_ranks(shapes, target)
        assert lowrank_params(uniform, shapes) <= target * original
        assert total <= sum(0.0 if r is None else float(losses[n][r]) for n, r in uniform.items())
    assert all(r is None for r in ranks_for_budget(losses, shapes, 1.0).values())


def test_ranks_for_budget_keeps_unfactorizable_matrices_dense():
    shapes = {"row": (1, 100), "square": (32, 32)}
    losses = {"row": truncation_losses(torch.ones(1)), "square": truncation_losses(torch.ones(32))}
    ranks = ranks_for_budget(losses, shapes, 0.5)
    assert ranks["row"] is None and ranks["square"] is not None
    with pytest.raises(SlimlmError, match="rank 1 everywhere"):
        ranks_for_budget(losses, shapes, 0.01)


def test_lowrank_linear_properties_and_dense():
    torch.manual_seed(0)
    first, second, bias = torch.randn(4, 10), torch.randn(6, 4), torch.randn(6)
    layer = LowRankLinear.from_factors(first, second, bias)
    assert (layer.in_features, layer.out_features, layer.rank) == (10, 6, 4)
    assert torch.allclose(layer.weight, second @ first)
    x = torch.randn(3, 10)
    assert torch.allclose(layer(x), x @ (second @ first).T + bias, atol=1e-5)
    assert torch.allclose(layer.dense()(x), layer(x), atol=1e-5)


def lowrank_llama():
    """tiny_llama with every block linear replaced by an exactly rank-``max_useful_rank`` weight."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    ranks = {}
    with torch.no_grad():
        for fqn, lin in linear_fqns(model).items():
            out, in_ = lin.weight.shape
            ranks[fqn] = max_useful_rank(out, in_)
            a, b = torch.randn(out, ranks[fqn], generator=g), torch.randn(ranks[fqn], in_, generator=g)
            lin.weight.copy_(a @ b / (ranks[fqn] * in_) ** 0.5)
    return model, ranks


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("method", ["svdllm", "welore"])
def test_factorize_at_full_useful_rank_keeps_the_logits_and_reloads(method):
    model, ranks = lowrank_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    dense_params = sum(p.numel() for p in model.parameters())
    hessians = collect_hessians(model, ids.repeat(3, 1), progress=False) if method == "svdllm" else None
    factorize_(model, ranks, method, hessians)
    after = logits(model, ids)
    assert (after - before).abs().max() < 1e-4
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert sum(p.numel() for p in model.parameters()) < dense_params
    rebuilt = tiny_llama(seed=5)
    rebuild_(rebuilt, describe(model))  # what a saved run's manifest records and slimlm.load_model does
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(logits(rebuilt, ids), after)


def test_collect_hessians_are_the_engine_statistics_of_the_dense_model():
    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(0))
    hessians = collect_hessians(model, ids, progress=False)
    assert set(hessians) == set(linear_fqns(model))
    q, k = hessians["model.layers.0.self_attn.q_proj"], hessians["model.layers.0.self_attn.k_proj"]
    assert q is k and q.shape == (64, 64)
    inputs = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    logits(model, ids)
    hook.remove()
    x = inputs[0].reshape(-1, 128).double()
    expected = 2 / x.shape[0] * x.T @ x
    assert relative(hessians["model.layers.1.mlp.down_proj"].double(), expected) < 1e-5


def test_factorize_refuses_bad_input():
    model, ranks = lowrank_llama()
    with pytest.raises(SlimlmError, match="needs the calibration Hessian"):
        factorize_(model, ranks, "svdllm", None)
    with pytest.raises(SlimlmError, match="unknown low-rank method"):
        factorize_(model, ranks, "tucker")
    with pytest.raises(SlimlmError, match="outside"):
        factorize_(model, {"model.layers.0.mlp.up_proj": 65}, "svd")
    assert singular_values(torch.eye(3)).tolist() == [1.0, 1.0, 1.0]
