"""Input transforms: x T with W T⁻ᵀ keeps every product, the transformed Hessian is Tᵀ H T, records round-trip."""
import torch

from slimlm.transforms.hadamard import random_orthogonal
from slimlm.transforms.ops import (Op, apply_ops, from_record, to_record, transform_hessian, transform_weight)


def ops_of_every_kind(n=12):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64) + 3 * torch.eye(3)  # invertible, not orthogonal
    B = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4)
    return [Op("scale", (torch.rand(n, generator=g, dtype=torch.float64) + 0.5,), fused=True),
            Op("blockrot", (random_orthogonal(4, 1, torch.float64).T,)),  # a non-contiguous one too
            Op("perm", (torch.randperm(n, generator=g),)),
            Op("kron", (A, B))]


def test_transformed_inputs_and_weights_keep_the_product():
    ops = ops_of_every_kind()
    x, W = torch.randn(5, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    assert torch.allclose(apply_ops(x, ops) @ transform_weight(W, ops).T, x @ W.T, atol=1e-10)
    kron = ops[-1].tensors
    assert torch.allclose(apply_ops(x, ops[-1:]), x @ torch.kron(*kron), atol=1e-10)


def test_transformed_hessian_equals_the_hessian_of_transformed_inputs():
    ops = ops_of_every_kind()
    X = torch.randn(50, 12, dtype=torch.float64)
    H = 2 / 50 * X.T @ X
    XT = apply_ops(X, ops)
    assert torch.allclose(transform_hessian(H, ops), 2 / 50 * XT.T @ XT, atol=1e-10)


def test_online_only_skips_fused_ops():
    ops = ops_of_every_kind()
    x = torch.randn(2, 12, dtype=torch.float64)
    assert torch.allclose(apply_ops(x, ops, online_only=True), apply_ops(x, ops[1:]))


def test_record_round_trip_stores_shared_tensors_once():
    ops = ops_of_every_kind()
    record, tensors = to_record({"a.q_proj": ops, "a.k_proj": ops, "a.o_proj": ops[1:2]})
    assert len(tensors) == 5  # scale, blockrot, perm, two kron factors: once each
    back = from_record(record, tensors)
    x = torch.randn(3, 12, dtype=torch.float64)
    for site in ("a.q_proj", "a.k_proj"):
        assert [op.fused for op in back[site]] == [op.fused for op in ops]
        assert torch.equal(apply_ops(x, back[site]), apply_ops(x, ops))
