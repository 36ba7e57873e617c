"""KV-cache quantization inside attention: the rotation alone keeps the function, rounding follows the grid."""
import pytest
import torch
from torch import nn

from tests.conftest import tiny_llama
from slimlm.errors import SlimlmError
from slimlm.hooks.kvcache import KVQuant, kv_specs_, quantize_kv_
from slimlm.transforms.hadamard import random_hadamard


def ids(n=2, T=24, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


def test_key_rotation_without_rounding_keeps_the_function():
    model = tiny_llama()
    reference = logits(model, ids())
    specs = kv_specs_(model)
    invertible = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) + 4 * torch.eye(16)
    for R in (random_hadamard(16, 0), invertible):
        for spec in specs:
            spec.key_rotation, spec.query_rotation = R, torch.linalg.inv(R.double()).mT.float()
        assert torch.allclose(logits(model, ids()), reference, atol=1e-5)


def test_rounding_is_per_head_and_token_asymmetric_and_spares_the_intact_prefix():
    x = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
    out = KVQuant(bits=4, intact=2)._quantize(x)
    assert torch.equal(out[..., :2, :], x[..., :2, :])
    rows = x[..., 2:, :].reshape(-1, 8)
    lo, hi = rows.amin(1, keepdim=True).clamp(max=0), rows.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    expected = (torch.clamp(torch.round(rows / scale) + zero, 0, 15) - zero) * scale
    assert torch.allclose(out[..., 2:, :].reshape(-1, 8), expected, atol=1e-6)


def test_fewer_kv_bits_cost_more_and_the_model_switches_attention():
    errors = []
    for bits in (8, 4, 2):
        model = tiny_llama()
        reference = logits(model, ids())
        quantize_kv_(model, bits)
        assert model.config._attn_implementation == "slimlm_sdpa"
        errors.append((logits(model, ids()) - reference).abs().mean().item())
    assert 0 < errors[0] < errors[1] < errors[2]


def test_bad_kv_settings_are_refused():
    model = tiny_llama()
    with pytest.raises(SlimlmError, match="KV-cache quantization: bits"):
        quantize_kv_(model, 9)
    with pytest.raises(SlimlmError, match="key rotation is 8-dimensional"):
        quantize_kv_(model, 4, key_rotation=torch.eye(8))
    for block in model.model.layers:
        block.self_attn = nn.Identity()
    with pytest.raises(SlimlmError, match="no attention with a KV cache"):
        quantize_kv_(model, 4)
