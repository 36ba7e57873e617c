"""Property tests for slimlm.quant: grids, RTN, GPTQ, Hadamard rotations, packing and storage accounting."""

import logging
import math

import pytest
import torch

from slimlm.core.linalg import hessian_inverse_cholesky
from slimlm.quant.gptq import gptq
from slimlm.quant.grids import QuantGrid, dequantize, fake_quant, quant_params, quantize, quantize_activations
from slimlm.quant.packing import pack_int, packed_bytes, unpack_int
from slimlm.quant.rtn import rtn
from slimlm.transforms.hadamard import hadamard_matrix, has_hadamard, random_hadamard, random_orthogonal

GRID_CASES = [(b, sym, gs) for b in range(2, 9) for sym in (True, False) for gs in (None, 50, 64)]


def weights(out=12, n=200, seed=0):
    """Gaussian rows of very different scales, plus an all-zero row and an all-zero group (columns 0..49)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * torch.logspace(-3, 1, out)[:, None]
    W[1] = 0
    W[2, :50] = 0
    return W


def correlated_inputs(n_tokens=256, n=100, seed=0):
    """Calibration inputs X (tokens, in) with strongly correlated channels and a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_tokens, n // 4, generator=g) @ torch.randn(n // 4, n, generator=g)
    X = X + 0.1 * torch.randn(n_tokens, n, generator=g)
    X[:, :3] *= 10
    return X


def output_error(X, W, Q):
    return ((X @ (W - Q).T) ** 2).sum().item()


# ---------------------------------------------------------------- grid validation

@pytest.mark.parametrize("bits", [1, 9, 0, 3.5, -4, True, "4", 4.0])
def test_grid_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantGrid(bits)


@pytest.mark.parametrize("kwargs", [{"group_size": 0}, {"group_size": -2}, {"clip_ratio": 0.0}, {"clip_ratio": 1.5}])
def test_grid_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        QuantGrid(4, **kwargs)


def test_group_size_minus_one_is_per_channel():
    assert QuantGrid(4, group_size=-1).group_size is None
    assert QuantGrid(4, True).qmin == -8 and QuantGrid(4, True).qmax == 7
    assert QuantGrid(4, False).qmin == 0 and QuantGrid(4, False).qmax == 15


# ---------------------------------------------------------------- RTN grid properties

@pytest.mark.parametrize("bits,symmetric,group_size", GRID_CASES)
def test_round_trip_within_half_step(bits, symmetric, group_size):
    W = weights()
    grid = QuantGrid(bits, symmetric, group_size)
    scale, zero = quant_params(W, grid)
    ngroups = 1 if group_size is None else math.ceil(200 / group_size)
    assert scale.shape == zero.shape == (12, ngroups)
    codes = quantize(W, scale, zero, grid)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert ((zero >= 0) & (zero <= grid.qmax) & (zero == zero.round())).all()
    Wq = fake_quant(W, grid)
    assert torch.isfinite(Wq).all()
    step = scale.repeat_interleave(group_size or 200, 1)[:, :200]
    fp32_slack = 4 * torch.finfo(torch.float32).eps * W.abs()  # w/scale is rounded before round()
    assert ((Wq - W).abs() <= step / 2 + fp32_slack).all()
    assert (Wq[1] == 0).all() and (Wq[2, :50] == 0).all()  # zeros stay exactly zero
    assert torch.equal(Wq, rtn(W, grid))


@pytest.mark.parametrize("bits,symmetric,group_size", GRID_CASES)
def test_codes_reproduced_exactly(bits, symmetric, group_size):
    """Values on a given grid quantize back to the same codes."""
    W = weights(seed=1)
    grid = QuantGrid(bits, symmetric, group_size)
    scale, zero = quant_params(W, grid)
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(grid.qmin, grid.qmax + 1, W.shape, generator=g).to(torch.int16)
    assert torch.equal(quantize(dequantize(codes, scale, zero, grid), scale, zero, grid), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_asymmetric_grid_values_are_fixed_points(bits):
    """A weight whose every group uses both ends of an asymmetric grid is reproduced exactly (cf. Q4_1 weights).
    Power-of-two scales keep the arithmetic exact."""
    grid = QuantGrid(bits, symmetric=False, group_size=32)
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, grid.qmax + 1, (6, 70), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, grid.qmax  # both ends in every group, the partial one included
    zero = torch.randint(0, grid.qmax + 1, (6, 3), generator=g).float()
    scale = 2.0 ** -torch.randint(0, 8, (6, 3), generator=g).float()
    W = dequantize(codes, scale, zero, grid)
    assert torch.equal(fake_quant(W, grid), W)


def test_scale_conventions_by_hand():
    W = torch.tensor([[-3.0, 1.0, 2.0, 0.5]])
    scale, zero = quant_params(W, QuantGrid(2, symmetric=False))  # scale = 5/3, zero = round(1.8) = 2
    assert torch.allclose(scale, torch.tensor([[5 / 3]])) and zero.item() == 2
    assert quantize(W, scale, zero, QuantGrid(2, False)).tolist() == [[0, 3, 3, 2]]
    scale, zero = quant_params(W, QuantGrid(2, symmetric=True))  # scale = 3 / 1.5, codes in [-2, 1]
    assert scale.item() == 2 and zero.item() == 0
    assert quantize(W, scale, zero, QuantGrid(2, True)).tolist() == [[-2, 0, 1, 0]]
    scale, _ = quant_params(W, QuantGrid(4, True, clip_ratio=0.5))
    assert scale.item() == pytest.approx(1.5 / 7.5)


def test_partial_last_group_uses_only_its_columns():
    W = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    W[:, :512] *= 100  # full groups are large; the last 64 columns are not
    scale, _ = quant_params(W, QuantGrid(4, group_size=128))
    assert scale.shape == (4, 5)
    assert torch.allclose(scale[:, 4], W[:, 512:].abs().amax(1) / 7.5)


def test_activation_quantization_is_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 64, generator=g)
    x[0, 0, 3] = 1000.0  # an outlier token must not coarsen the others
    y = quantize_activations(x, bits=4)
    assert y.shape == x.shape and y.dtype == x.dtype
    for b in range(2):
        for t in range(5):
            assert torch.equal(y[b, t], fake_quant(x[b, t][None], QuantGrid(4))[0])
    assert (y[1] - x[1]).abs().max() < 0.5
    kv = quantize_activations(x, bits=4, symmetric=False, group_size=16, clip_ratio=0.9)
    assert torch.isfinite(kv).all() and kv.shape == x.shape


# ---------------------------------------------------------------- GPTQ

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])  # 32 does not divide 100: a partial last group
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, act_order, symmetric):
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(3))
    grid = QuantGrid(bits, symmetric, group_size)
    Q, row_loss = gptq(W, H, grid, blocksize=16, act_order=act_order)
    assert torch.isfinite(Q).all() and row_loss.shape == (24,) and (row_loss > 0).all()
    assert output_error(X, W, Q) < 0.8 * output_error(X, W, rtn(W, grid))


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loss_is_hessian_weighted_error(act_order):
    """The OBS error sum equals ½ Σ_rows (W−Q) H̃ (W−Q)ᵀ for the damped Hessian H̃."""
    X = correlated_inputs(n=64)
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    Q, row_loss = gptq(W, H, QuantGrid(3, group_size=16), blocksize=24, damp=0.05, act_order=act_order)
    H_damped = H + 0.05 * torch.diag(H).mean() * torch.eye(64)
    D = (W - Q).double()
    expected = 0.5 * torch.einsum("ri,ij,rj->r", D, H_damped.double(), D)
    torch.testing.assert_close(row_loss.double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("grid", [QuantGrid(3), QuantGrid(4, False, 32), QuantGrid(2, True, 64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_equals_rtn_without_correlation(grid, act_order):
    """With a diagonal Hessian the OBS update is zero, so GPTQ is round-to-nearest."""
    W = torch.randn(8, 100, generator=torch.Generator().manual_seed(5))
    H = torch.diag(torch.rand(100, generator=torch.Generator().manual_seed(6)) + 0.1)
    Q, _ = gptq(W, H, grid, blocksize=32, act_order=act_order)
    assert torch.allclose(Q, rtn(W, grid), atol=1e-6)


def test_gptq_act_order_undoes_permutation():
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(7))
    grid = QuantGrid(4)
    perm = torch.argsort(torch.diag(H), descending=True)
    Q_manual, _ = gptq(W[:, perm], H[perm][:, perm], grid, blocksize=16)
    Q, _ = gptq(W, H, grid, blocksize=16, act_order=True)
    assert torch.allclose(Q[:, perm], Q_manual, atol=1e-6)


def test_gptq_act_order_groups_follow_original_columns():
    """With act_order, groups are static and contiguous in the original order: Q lies on RTN's grid of W."""
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(8))
    grid = QuantGrid(3, False, 32)
    Q, _ = gptq(W, H, grid, blocksize=16, act_order=True)
    scale, zero = quant_params(W, grid)
    assert torch.allclose(dequantize(quantize(Q, scale, zero, grid), scale, zero, grid), Q, atol=1e-6)
    assert not torch.allclose(Q, rtn(W, grid))


@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_groups_use_at_most_2_to_the_bits_levels(static_groups):
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(9))
    Q, _ = gptq(W, H, QuantGrid(2, False, 32), blocksize=16, static_groups=static_groups)
    for row in Q:
        for group in row.split(32):
            assert group.unique().numel() <= 4


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_stacked_rows_equals_separate_runs(act_order):
    """Linears that read one input (q/k/v) can share a sweep: rows are independent given H."""
    X = correlated_inputs()
    H = 2 / X.shape[0] * X.T @ X
    Ws = [torch.randn(r, 100, generator=torch.Generator().manual_seed(r)) for r in (24, 8, 8)]
    grid = QuantGrid(4, False, 32)
    Q, row_loss = gptq(torch.cat(Ws), H, grid, blocksize=16, act_order=act_order)
    separate = [gptq(W, H, grid, blocksize=16, act_order=act_order) for W in Ws]
    torch.testing.assert_close(Q, torch.cat([q for q, _ in separate]), rtol=0, atol=1e-5)
    torch.testing.assert_close(row_loss, torch.cat([loss for _, loss in separate]), rtol=1e-4, atol=0)


def test_gptq_dead_inputs_and_dtype():
    X = correlated_inputs()
    X[:, 5] = 0
    H = 2 / X.shape[0] * X.T @ X
    W = torch.randn(24, 100, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    Q, row_loss = gptq(W, H, QuantGrid(4, group_size=32), blocksize=16)
    assert Q.dtype == torch.bfloat16 and Q.shape == W.shape and torch.isfinite(row_loss).all()
    assert (Q[:, 5] == 0).all()


def test_hessian_inverse_cholesky():
    X = correlated_inputs(n=40)
    H = 2 / X.shape[0] * X.T @ X
    U = hessian_inverse_cholesky(H, damp=0.01)
    assert torch.equal(U, U.triu())
    H_damped = H.double() + 0.01 * torch.diag(H).double().mean() * torch.eye(40, dtype=torch.float64)
    assert torch.allclose((U.T @ U).double() @ H_damped, torch.eye(40, dtype=torch.float64), atol=1e-3)


def test_hessian_inverse_cholesky_retries_then_raises(caplog):
    singular = torch.diag(torch.tensor([1.0, 0.0]))
    with caplog.at_level(logging.WARNING, logger="slimlm.quant"):
        U = hessian_inverse_cholesky(singular, damp=0.0)
    assert torch.isfinite(U).all() and "retrying" in caplog.text
    with pytest.raises(ValueError):
        hessian_inverse_cholesky(torch.full((3, 3), float("nan")))
    with pytest.raises(RuntimeError):  # indefinite: damping cannot fix it within the retries
        hessian_inverse_cholesky(torch.tensor([[1.0, 50.0], [50.0, 1.0]]), damp=0.01)


# ---------------------------------------------------------------- rotations

@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 60, 64, 80, 96, 128, 576, 960, 1536])
def test_hadamard_is_orthogonal(n):
    H = hadamard_matrix(n, torch.float64)
    assert torch.allclose(H @ H.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full_like(H, n**-0.5))


@pytest.mark.parametrize("n", [4096, 11008])
def test_large_hadamard_rows_are_orthonormal(n):
    H = hadamard_matrix(n)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:8]
    assert torch.allclose(H[rows] @ H.T, torch.nn.functional.one_hot(rows, n).float(), atol=1e-5)


def test_power_of_two_hadamard_is_sylvester():
    H2 = torch.tensor([[1.0, 1], [1, -1]])
    assert torch.equal(torch.sign(hadamard_matrix(8)), torch.kron(H2, torch.kron(H2, H2)))


def test_unsupported_orders():
    for n in (3, 6, 10):
        assert not has_hadamard(n)
    assert not has_hadamard(172)
    with pytest.raises(ValueError, match="random_orthogonal"):
        hadamard_matrix(172)
    R = random_hadamard(172, seed=0)  # falls back to a random orthogonal matrix
    assert torch.allclose(R @ R.T, torch.eye(172), atol=1e-5)


def test_random_rotations_are_orthogonal_and_seeded():
    for make in (random_hadamard, random_orthogonal):
        R = make(576, seed=1)
        assert torch.allclose(R @ R.T, torch.eye(576), atol=1e-5)
        assert torch.equal(R, make(576, seed=1)) and not torch.equal(R, make(576, seed=2))
    signs = random_hadamard(64, seed=3) / hadamard_matrix(64)  # H·diag(s): each column scaled by ±1
    assert torch.equal(signs, signs[:1].expand(64, -1)) and set(signs[0].tolist()) == {-1.0, 1.0}


def test_rotation_leaves_matmul_invariant():
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 576, generator=g, dtype=torch.float64), torch.randn(576, 48, generator=g, dtype=torch.float64)
    R = random_hadamard(576, seed=0, dtype=torch.float64)
    assert torch.allclose((x @ R) @ (R.T @ W), x @ W, atol=1e-10)


# ---------------------------------------------------------------- packing and bytes

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_pack_unpack_round_trip(bits, signed):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = torch.randint(lo, hi, (3, 5, 37), generator=torch.Generator().manual_seed(bits))
    packed = pack_int(codes, bits, signed)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, math.ceil(37 * bits / 32))
    assert torch.equal(unpack_int(packed, bits, 37, signed), codes.to(torch.int16))


def test_pack_layout_by_hand():
    assert pack_int(torch.arange(1, 9), 4).tolist() == [0x87654321 - 2**32]  # little-endian nibbles
    assert pack_int(torch.tensor([1, 2], dtype=torch.int8), 8, signed=True).tolist() == [33409]  # 129 | 130 << 8
    assert pack_int(torch.full((11,), 7), 3).tolist() == [-1, 1]  # 33 one-bits straddle two words
    with pytest.raises(ValueError, match="out of range"):
        pack_int(torch.tensor([8]), 3)


def test_packed_bytes_by_hand():
    # (10, 200), 3 bits, groups of 64 -> 4 groups (64, 64, 64, 8).
    # codes: ceil(200*3/32) = 19 words = 76 B per row -> 760; scales 10*4*2 = 80; zeros 4 groups * 1 word = 16.
    assert packed_bytes((10, 200), QuantGrid(3, True, 64)) == 760 + 80
    assert packed_bytes((10, 200), QuantGrid(3, False, 64)) == 760 + 80 + 16
    # half kept: 1000 codes * 3 bits = 94 words = 376 B; mask 10 rows * 25 B = 250.
    assert packed_bytes((10, 200), QuantGrid(3, False, 64), mask_density=0.5) == 376 + 250 + 80 + 16
    codes = torch.zeros(10, 200, dtype=torch.int64)
    assert pack_int(codes, 3).numel() * 4 == 760
    # 70% sparse + INT4-g128 + bitmask: 0.3·4 (kept codes) + 1 (mask) + 16/128 (float16 scales) = 2.325 bits per weight
    bits_per_weight = 8 * packed_bytes((4096, 4096), QuantGrid(4, True, 128), mask_density=0.3) / 4096**2
    assert bits_per_weight == pytest.approx(2.325, abs=1e-3)
    with pytest.raises(ValueError):
        packed_bytes((10, 200), QuantGrid(4), mask_density=0.0)
