"""QuaRot rotations on tiny random Llamas: function preserved, weights really rotated, outliers spread."""

import copy

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.transforms import ops, rotate as rot
from slimlm.transforms.hadamard import random_hadamard
from slimlm.transforms.rotate import attach_online_down_, fuse_norms_, quantize_activations_, rotate_
from tests.conftest import tiny_llama, tiny_opt

OUTLIERS = [3, 17, 40]  # hidden channels scaled by 20 in the embedding


def prepare(model, seed=0, outliers=True):
    """Non-trivial RMSNorm scales (so folding is really tested) and a few large hidden channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
        if outliers:
            model.get_input_embeddings().weight[:, OUTLIERS] *= 20
    return model


def llama(hidden=64, intermediate=128, heads=4, kv_heads=2, tied=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=128,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    return prepare(LlamaForCausalLM(config).eval(), seed, outliers=False)


def tokens(seed=1, batch=2, length=32):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def assert_same_function(a, b, ids, rtol=1e-4):
    ref = logits(a, ids)
    assert (logits(b, ids) - ref).abs().max() <= rtol * ref.abs().max()


def test_fuse_norms_keeps_logits_and_sets_unit_scales():
    model = prepare(tiny_llama())
    fused = fuse_norms_(copy.deepcopy(model))
    assert_same_function(model, fused, tokens())
    norms = [p for name, p in fused.named_parameters() if "norm" in name]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    q0, q1 = model.model.layers[0].self_attn.q_proj.weight, fused.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q0, q1)


@pytest.mark.parametrize("online_down", [False, True])
@pytest.mark.parametrize("value_heads", [False, True])
def test_rotate_keeps_logits(online_down, value_heads):
    model = prepare(tiny_llama())
    rotated = copy.deepcopy(model)
    record = rotate_(rotated, seed=3, online_down=online_down, value_heads=value_heads)
    assert_same_function(model, rotated, tokens())
    assert record["residual"] == "randomized_hadamard"
    assert bool(record["online_down"]) == online_down and bool(record["value_heads"]) == value_heads


def test_rotate_falls_back_to_random_orthogonal():
    """Hidden 52 and head_dim 26 have no Hadamard construction in transforms.hadamard.hadamard_matrix."""
    model = llama(hidden=52, intermediate=104, heads=2, kv_heads=1)
    rotated = copy.deepcopy(model)
    record = rotate_(rotated)
    assert record["residual"] == "random_orthogonal" and record["value_heads"] == "random_orthogonal"
    assert record["online_down"] == "randomized_hadamard"
    assert_same_function(model, rotated, tokens())


def test_rotation_really_rotates_with_an_orthogonal_matrix():
    model = prepare(tiny_llama())
    rotated = copy.deepcopy(model)
    rotate_(rotated, seed=5)
    Q = random_hadamard(64, 5, torch.float64)
    assert torch.allclose(Q.T @ Q, torch.eye(64, dtype=torch.float64), atol=1e-12)
    E, E_rot = model.get_input_embeddings().weight, rotated.get_input_embeddings().weight
    assert torch.allclose(E_rot.double(), E.double() @ Q, atol=1e-5)
    assert (E_rot - E).abs().max() > 0.1
    for name, lin in rotated.model.layers[1].named_modules():
        if isinstance(lin, torch.nn.Linear):
            assert not torch.allclose(lin.weight, model.get_submodule(f"model.layers.1.{name}").weight), name


def quant_error(model, ids, bits=4):
    ref = logits(model, ids)
    quantized = copy.deepcopy(model)
    quantize_activations_(quantized, bits)
    return ((logits(quantized, ids) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_reduces_4bit_activation_error(seed):
    """QuaRot's claim in miniature: with outlier channels, W16A4 error is lower after rotation."""
    model = prepare(tiny_llama(seed=seed), seed)
    rotated = copy.deepcopy(model)
    rotate_(rotated, seed=seed)
    ids = tokens(seed)
    assert quant_error(rotated, ids) < 0.7 * quant_error(model, ids)


def peak_to_mean(model, suffix, ids):
    """max |x| / mean |x| per token of the inputs that reach the quantizer of every `suffix` linear."""
    ratios = []

    def record(module, args):
        x = args[0].abs()
        ratios.append((x.amax(-1) / x.mean(-1)).mean())

    handles = [m.register_forward_pre_hook(record) for n, m in model.named_modules() if n.endswith(suffix)]
    logits(model, ids)
    for h in handles:
        h.remove()
    return torch.stack(ratios).mean().item()


@pytest.mark.parametrize("suffix", ["q_proj", "down_proj"])
def test_rotation_flattens_quantized_activations(suffix):
    model = prepare(tiny_llama())
    rotated = copy.deepcopy(model)
    rotate_(rotated)
    assert peak_to_mean(rotated, suffix, tokens()) < peak_to_mean(model, suffix, tokens())


def test_online_rotation_runs_before_activation_quantization(monkeypatch):
    """Even when quantize_activations_ hooks are registered first, the quantizer sees x H, not x."""
    model = prepare(tiny_llama())
    seen = []
    monkeypatch.setattr(ops, "quantize_activations", lambda x, bits, clip, symmetric: seen.append(x) or x)
    quantize_activations_(model, 4, targets="layers.0.mlp.down_proj")
    rotate_(model, seed=2)
    raw = []
    down = model.model.layers[0].mlp.down_proj
    down.register_forward_pre_hook(lambda m, args: raw.append(args[0]), prepend=True)
    logits(model, tokens())
    H = random_hadamard(128, 2 + rot.DOWN_SEED_OFFSET)
    assert len(seen) == len(raw) == 1
    assert torch.allclose(seen[0], raw[0] @ H, atol=1e-6) and not torch.allclose(seen[0], raw[0], atol=1e-3)


def test_reloaded_rotated_model_needs_online_hook(tmp_path):
    from transformers import AutoModelForCausalLM

    model = prepare(tiny_llama())
    rotate_(model, seed=4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    assert not torch.allclose(logits(reloaded, ids), logits(model, ids), atol=1e-3)
    attach_online_down_(reloaded, seed=4)
    assert_same_function(model, reloaded, ids, rtol=1e-6)
    with pytest.raises(SlimlmError, match="already has an online rotation"):
        rotate_(reloaded)


def test_tied_embeddings_are_untied(tmp_path):
    from transformers import AutoModelForCausalLM

    model = llama(tied=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    fused = fuse_norms_(copy.deepcopy(model))
    assert fused.lm_head.weight is not fused.get_input_embeddings().weight
    assert not fused.config.tie_word_embeddings
    assert torch.equal(fused.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert_same_function(model, fused, tokens())
    fused.save_pretrained(tmp_path)
    assert_same_function(fused, AutoModelForCausalLM.from_pretrained(tmp_path).eval(), tokens(), rtol=0)


def tiny_gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=128)
    return GemmaForCausalLM(config).eval()


@pytest.mark.parametrize("make, message", [(tiny_gemma, r"\(1 \+ w\)"), (tiny_opt, "rotation supports")])
@pytest.mark.parametrize("fn", [fuse_norms_, rotate_])
def test_unsupported_architectures_are_rejected_untouched(make, message, fn):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=message):
        fn(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantize_activations_targets_and_removal():
    model = prepare(tiny_llama())
    ids = tokens()
    ref = logits(model, ids)
    handles = quantize_activations_(model, 4, targets=["mlp.down_proj"])
    assert len(handles) == 2
    assert not torch.allclose(logits(model, ids), ref)
    for h in handles:
        h.remove()
    assert torch.equal(logits(model, ids), ref)
    with pytest.raises(SlimlmError, match="no decoder linear"):
        quantize_activations_(model, 4, targets=["lm_head"])
    with pytest.raises(SlimlmError, match="bits"):
        quantize_activations_(model, 1)
