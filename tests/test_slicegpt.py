"""SliceGPT on tiny random Llamas: invariance before deletion, PCA optimality, real slicing, bad input."""

import copy
import json

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.structured.slicegpt import SlicedLayer, param_counts, pca, slice_, sliced_dim
from slimlm.transforms.rotate import fuse_norms_
from tests.conftest import tiny_llama, tiny_opt

VOCAB, HIDDEN = 128, 64


def llama(seed=0, tied=False):
    """A tiny Llama with RMSNorm scales away from 1, so that folding them into the readers really matters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape) * 1.5 + 0.25)
    return model


def tokens(seed=1, n=4, length=32):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits


def relative_error(model, reference, ids) -> float:
    ref = logits(reference, ids)
    return ((logits(model, ids) - ref).abs().max() / ref.abs().max()).item()


def test_fusing_norms_keeps_logits():
    model = llama()
    assert relative_error(fuse_norms_(copy.deepcopy(model)), model, tokens()) < 1e-4


@pytest.mark.parametrize("tied", [False, True])
def test_full_rotation_without_slicing_keeps_logits(tied):
    """Sparsity 0: every basis is a full orthogonal matrix, so only the computational invariance (§3.2) acts."""
    model = llama(tied=tied)
    sliced = copy.deepcopy(model)
    record = slice_(sliced, tokens(seed=2), 0.0, progress=False)
    assert record["sliced_hidden"] == HIDDEN
    assert all(isinstance(layer, SlicedLayer) for layer in sliced.model.layers)
    assert relative_error(sliced, model, tokens()) < 1e-4
    q_before, q_after = model.model.layers[0].self_attn.q_proj.weight, sliced.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(q_before, q_after)  # really rotated
    json.dumps(record)


def test_quarter_sparsity_slices_every_part():
    model = llama()
    before = param_counts(model)
    record = slice_(model, tokens(seed=2), 0.25, progress=False)
    kept = sliced_dim(HIDDEN, 0.25)
    assert kept == record["sliced_hidden"] == 48
    layer = model.model.layers[0]
    assert model.get_input_embeddings().weight.shape == (VOCAB, kept)
    assert model.get_output_embeddings().weight.shape == (VOCAB, kept)
    assert layer.self_attn.q_proj.weight.shape[1] == layer.mlp.gate_proj.weight.shape[1] == kept
    assert layer.self_attn.o_proj.weight.shape[0] == layer.mlp.down_proj.weight.shape[0] == kept
    assert layer.attn_shortcut.weight.shape == layer.mlp_shortcut.weight.shape == (kept, kept)
    out = logits(model, tokens())
    assert out.shape == (4, 32, VOCAB) and torch.isfinite(out).all()
    after = param_counts(model)
    assert after == record["params"]["after"] and before == record["params"]["before"]
    assert after["total"] < before["total"] and after["decoder_linears"] < before["decoder_linears"]
    assert after["shortcuts"] == 2 * len(model.model.layers) * kept * kept
    assert all(0.5 < layer[f"{part}_kept_variance"] < 1 for layer in record["layers"] for part in ("attn", "mlp"))


def test_sliced_model_generates_with_its_cache():
    """The KV cache goes through SlicedLayer: greedy generation equals the argmax of full recomputation."""
    model = llama()
    slice_(model, tokens(seed=2), 0.25, progress=False)
    prompt = tokens(n=1, length=8)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for t in range(prompt.shape[1], out.shape[1]):
        assert logits(model, out[:, :t])[0, -1].argmax() == out[0, t]


def test_sliced_dim_rounds_to_multiples_of_eight():
    assert sliced_dim(576, 0.2) == 464 and sliced_dim(576, 0.3) == 400 and sliced_dim(4096, 0.25) == 3072
    assert sliced_dim(32, 0.25) == 24 and sliced_dim(64, 0.99) == 8 and sliced_dim(64, 0.0) == 64


def test_pca_keeps_the_top_variance_directions():
    """‖X − X Q_k Q_kᵀ‖²_F is the sum of the dropped eigenvalues; a random k-dimensional subspace does worse."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    X = X @ torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    values, Q = pca(X.T @ X)
    assert (values[:-1] >= values[1:]).all()
    assert torch.allclose(Q.T @ Q, torch.eye(16, dtype=torch.float64), atol=1e-10)
    for k in (1, 4, 12):
        Qk = Q[:, :k]
        error = (X - X @ Qk @ Qk.T).square().sum()
        assert torch.isclose(error, values[k:].sum(), rtol=1e-8)
        other = torch.linalg.qr(torch.randn(16, k, generator=g, dtype=torch.float64))[0]
        assert (X - X @ other @ other.T).square().sum() > error


def subspace_llama(rank=32):
    """A Llama whose residual stream lives in a ``rank``-dimensional subspace: the embedding and every writer
    (o_proj, down_proj) project onto it, so slicing to ``rank`` directions loses nothing."""
    model = llama()
    U = torch.linalg.qr(torch.randn(HIDDEN, rank, generator=torch.Generator().manual_seed(3)))[0]
    P = U @ U.T
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight @ P)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(P @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(P @ layer.mlp.down_proj.weight)
    return model


def test_slicing_a_residual_that_lives_in_a_subspace_is_exact():
    model = subspace_llama(rank=32)
    sliced = copy.deepcopy(model)
    record = slice_(sliced, tokens(seed=2), 0.5, progress=False)
    assert record["sliced_hidden"] == 32
    assert all(layer[f"{part}_kept_variance"] > 1 - 1e-9 for layer in record["layers"] for part in ("attn", "mlp"))
    assert relative_error(sliced, model, tokens()) < 1e-4
    cut = copy.deepcopy(model)  # below the subspace's dimension slicing loses signal
    slice_(cut, tokens(seed=2), 0.75, progress=False)
    assert relative_error(cut, model, tokens()) > 1e-2


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.2"])
def test_bad_sparsity_is_refused_before_any_change(sparsity):
    model = llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match="sparsity"):
        slice_(model, tokens(), sparsity, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_models_and_calibration_are_refused():
    with pytest.raises(SlimlmError, match="Llama-family"):
        slice_(tiny_opt(), tokens(), 0.25, progress=False)
    with pytest.raises(SlimlmError, match="token ids"):
        slice_(tiny_llama(), torch.rand(2, 8), 0.25, progress=False)
    with pytest.raises(SlimlmError, match="vocabulary"):
        slice_(tiny_llama(), tokens() + VOCAB, 0.25, progress=False)
    model = tiny_llama()
    slice_(model, tokens(), 0.25, progress=False)
    with pytest.raises(SlimlmError, match="already sliced"):
        slice_(model, tokens(), 0.25, progress=False)
