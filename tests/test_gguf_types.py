"""llama.cpp's weight types: our encoder against the gguf package's independent decoder, the scale search against
llama.cpp's reference quantizers, GPTQ on each grid against RTN on the same grid, and the named mixes' rules."""
import gguf
import numpy as np
import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.gguf.blocks import pack
from slimlm.gguf.mixes import named_mix, use_more_bits
from slimlm.gguf.types import TYPES, fit, gguf_type
from slimlm.quant.gptq import gptq_gguf


def weights(rows=6, width=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, width, generator=g) * 0.02
    W[0, :64] = 0  # an all-zero block
    W[1, :32] = -W[1, :32].abs()  # a block with no positive weight
    W[2, 5] = 0.4  # an outlier
    return W


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("importance", [False, True])
def test_bytes_decode_bit_exactly_with_the_gguf_package(name, importance):
    W = weights()
    imp = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(1)) if importance else None
    fitted = fit(TYPES[name], W, imp)
    data = pack(fitted)
    assert data.shape == (W.shape[0], W.shape[1] // TYPES[name].block * TYPES[name].nbytes)
    decoded = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    assert np.array_equal(decoded.view(np.uint32), fitted.values().numpy().view(np.uint32))
    rel = ((fitted.values() - W).square().sum() / W.square().sum()).item()
    assert rel < {"Q2_K": 0.2, "Q3_K": 0.06}.get(name, 0.02)  # a grid near the weights, not just a decodable one


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_scale_search_beats_llama_cpp_reference_rounding(name):
    """The reference quantizers (gguf.quants, ports of ggml's quantize_row_*_ref: scale from the block's extreme
    values, no search) give a larger squared error than our weighted least-squares search."""
    W = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    qtype = gguf.GGMLQuantizationType[name]
    ref = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), qtype), qtype)
    ours = fit(TYPES[name], W).values().numpy()
    assert ((ours - W.numpy()) ** 2).sum() < ((ref - W.numpy()) ** 2).sum()


@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_on_each_grid_has_lower_output_error_than_rtn(name, act_order):
    g = torch.Generator().manual_seed(3)
    n = 512
    X = torch.randn(1024, n, generator=g) @ (torch.eye(n) + 0.1 * torch.randn(n, n, generator=g))
    W = torch.randn(32, n, generator=g) * 0.05
    H = 2 * X.T @ X / X.shape[0]
    fitted, loss = gptq_gguf(W, H, TYPES[name], act_order=act_order)
    decoded = gguf.quants.dequantize(pack(fitted), gguf.GGMLQuantizationType[name])
    assert np.array_equal(decoded, fitted.values().numpy())  # what GPTQ minimised is what the file holds
    error = lambda Q: (X @ (Q - W).T).square().mean().item()
    assert error(fitted.values()) < 0.8 * error(fit(TYPES[name], W, torch.diag(H)).values())
    assert loss.shape == (32,) and (loss >= 0).all()


def test_a_row_the_type_cannot_hold_is_one_clear_error():
    with pytest.raises(SlimlmError, match="multiple of 256"):
        fit(TYPES["Q4_K"], torch.randn(4, 576))
    with pytest.raises(SlimlmError, match="unknown GGUF type"):
        gguf_type("Q4_K_X")


def smollm_shapes(n_layer=30, hidden=576, inter=1536, kv=192):
    shapes = {"token_embd.weight": (49152, hidden)}
    for i in range(n_layer):
        for role, shape in [("attn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
                            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)), ("ffn_norm", (hidden,)),
                            ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)), ("ffn_down", (hidden, inter))]:
            shapes[f"blk.{i}.{role}.weight"] = shape
    shapes["output_norm.weight"] = (hidden,)
    return shapes


def test_named_mix_rules_on_the_built_in_shapes():
    """Hand-derived from llama-quantize's rules for a tied 30-layer model with 576-wide rows (not 256-blocks):
    Q4_K_M's attn_v / ffn_down bumps follow use_more_bits; 576-wide K-types fall back (Q4_K -> Q5_0,
    Q6_K -> Q8_0); the tied embedding is the output matrix: Q6_K -> Q8_0."""
    types = named_mix("Q4_K_M", smollm_shapes(), 30, gqa=3)
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    for i in range(30):
        assert types[f"blk.{i}.attn_q.weight"] == "Q5_0"
        assert types[f"blk.{i}.attn_v.weight"] == ("Q8_0" if use_more_bits(i, 30) else "Q5_0")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if use_more_bits(i, 30) else "Q4_K")
    assert sum(use_more_bits(i, 30) for i in range(30)) == 14  # about half the layers
    q2 = named_mix("Q2_K", smollm_shapes(), 30, gqa=3)
    assert {q2[f"blk.{i}.ffn_down.weight"] for i in range(30)} == {"Q3_K"}
    assert q2["blk.0.ffn_up.weight"] == "Q4_0"  # Q2_K on 576-wide rows falls back to Q4_0
    q40 = named_mix("Q4_0", smollm_shapes(), 30, gqa=3, has_imatrix=True)
    assert [q40[f"blk.{i}.ffn_down.weight"] for i in range(4)] == ["Q4_1", "Q4_1", "Q4_1", "Q4_0"]
    with pytest.raises(SlimlmError, match="unknown GGUF mix"):
        named_mix("Q4_K_X", smollm_shapes(), 30, gqa=3)


def test_iq4_mix_rules_on_the_built_in_shapes():
    """As llama-quantize writes the built-in model (F16 -> IQ4_XS, no imatrix): 576-wide rows fall back from IQ4_XS
    to IQ4_NL, the 1536-wide ffn_down holds IQ4_XS except the first eighth (Q5_K, dropped with an imatrix), attn_v
    takes Q5_K only where 4 or more query heads share a KV head."""
    xs = named_mix("IQ4_XS", smollm_shapes(), 30, gqa=3)
    assert [xs[f"blk.{i}.ffn_down.weight"] for i in range(5)] == ["Q5_K"] * 3 + ["IQ4_XS"] * 2
    assert {xs[f"blk.{i}.{r}.weight"] for i in range(30) for r in ("attn_q", "attn_v", "ffn_up")} == {"IQ4_NL"}
    assert xs["token_embd.weight"] == "Q8_0"
    assert named_mix("IQ4_XS", smollm_shapes(), 30, gqa=3, has_imatrix=True)["blk.0.ffn_down.weight"] == "IQ4_XS"
    assert named_mix("IQ4_NL", smollm_shapes(), 30, gqa=4)["blk.7.attn_v.weight"] == "Q5_1"  # Q5_K falls back
