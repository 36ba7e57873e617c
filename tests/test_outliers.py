"""Outlier-aware transforms in the block loop: the same function before rounding, less error after it."""
import pytest
import torch

import slimlm
from slimlm.core.architectures import linear_fqns
from slimlm.core.engine import compress_blocks
from slimlm.errors import SlimlmError
from slimlm.transforms.outliers import TransformSettings, transforming
from tests.conftest import LLAMA_FAMILY, tiny_llama, tiny_opt
from tests.test_intactkv import Tokenizer


def ids(n=4, T=32, seed=0):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def outlier_llama(size=30.0, arch="llama"):
    """A tiny Llama-family model whose norms put a large channel into q/k/v's and gate/up's inputs; same
    function."""
    model = LLAMA_FAMILY[arch]()
    with torch.no_grad():
        for block in model.model.layers:
            for norm, readers in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (block.post_attention_layernorm, ("gate_proj", "up_proj"))):
                norm.weight[5] *= size
                parent = block.self_attn if readers[0] == "q_proj" else block.mlp
                for name in readers:
                    getattr(parent, name).weight[:, 5] /= size
    return model


@torch.no_grad()
def logits(model, x=None):
    return model(input_ids=ids(2, seed=1) if x is None else x).logits


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
@pytest.mark.parametrize("name", ["smoothquant", "duquant"])
def test_transforms_alone_keep_the_function(name, arch):
    model = outlier_llama(arch=arch)
    reference = logits(model)
    sites = {}
    compress = transforming(model, TransformSettings(name, 0.5, steps=8), lambda group, stats: False, sites)
    compress_blocks(model, ids(), compress, set(linear_fqns(model)), window_mean=True, progress=False)
    assert torch.allclose(logits(model), reference, atol=1e-4)
    transformed = {fqn.rsplit(".", 1)[1] for fqn in sites}
    expected = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} | ({"o_proj", "down_proj"} if name ==
                                                                          "duquant" else set())
    assert transformed == expected
    assert model.model.layers[0].input_layernorm.weight[5].item() < 30  # the smoothing went into the norm


def error(transform, wbits, abits, method="rtn"):
    model = outlier_llama()
    reference = logits(model)
    slimlm.quantize(model, method=method, wbits=wbits, abits=abits, group_size=None, transform=transform,
                    calib=ids(), progress=False)
    return ((logits(model) - reference) ** 2).mean().item()


def test_smoothing_and_rotations_beat_plain_rounding_with_outliers():
    assert error("smoothquant", 8, 8) < error(None, 8, 8)
    assert error("duquant", 4, 4) < error(None, 4, 4)
    assert error("duquant", 4, 4, "gptq") < error(None, 4, 4, "gptq")


@pytest.mark.parametrize("transform,lwc,arch", [("duquant", False, "llama"), ("duquant", True, "llama"),
                                               ("flatquant", False, "llama"), ("duquant", False, "qwen2"),
                                               ("flatquant", False, "qwen2"), ("flatquant", False, "qwen3")])
def test_transformed_runs_reload_identically(tmp_path, transform, lwc, arch):
    from transformers import AutoModelForCausalLM

    model = outlier_llama(arch=arch)
    result = slimlm.quantize(model, Tokenizer(), method="gptq", wbits=4, abits=4, kvbits=4, group_size=None,
                             transform=transform, lwc=lwc, intact_kv="bos", calib=ids(), progress=False,
                             epochs=2 if lwc or transform == "flatquant" else None)
    manifest = result.manifest
    assert manifest["transform"]["method"] == transform and manifest["intact_kv"]["tokens"] == [1]
    if lwc:
        assert manifest["weight_clip"] == 1.0 and manifest["transform"]["alpha"] == 0.5
        assert len(manifest["transform"]["training"]["block_losses"]) == 2
    elif transform == "duquant":
        assert manifest["transform"]["alpha"] == 0.6 and manifest["kv_cache"]["key_rotation"] == "hadamard"
        assert (manifest["weight_clip"], manifest["act_clip"], manifest["act_symmetric"]) == (0.8, 0.9, False)
    else:
        assert manifest["kv_cache"]["key_rotation"] == "learned" and len(manifest["kv_cache"]["clips"]) == 2
        assert len(manifest["act_clips"]) == 14 and manifest["transform"]["training"]["epochs"] == 2
    quantized = logits(model)
    out = slimlm.save(model, None, tmp_path / "run", result)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with pytest.raises(SlimlmError, match="pass the run folder"):
        slimlm.apply_runtime(reloaded, manifest)
    slimlm.apply_runtime(reloaded, manifest, out)
    assert torch.equal(logits(reloaded), quantized)


@pytest.mark.parametrize("kwargs,message", [
    ({"transform": "flat"}, "--transform: unknown value 'flat' \\(did you mean 'flatquant'\\?\\)"),
    ({"transform": "duquant", "alpha": 1.5}, "alpha must be in"),
    ({"alpha": 0.5}, "--alpha only applies with --transform"),
    ({"kvbits": 1}, "KV-cache quantization: bits"),
    ({"abits": 4, "act_clip": 0}, "activation quantization: clip_ratio"),
    ({"transform": "duquant", "rotate": "hadamard"}, "choose one"),
    ({"intact_kv": "bos"}, "needs the model.s tokenizer"),
    ({"transform": "flatquant", "lwc": True}, "--lwc only applies with --transform duquant"),
    ({"transform": "duquant", "epochs": 3}, "--epochs only applies with --transform flatquant or --lwc"),
    ({"rotate": "hadamard", "calibrate_kv": True}, "--calibrate-kv only applies with --intact-kv"),
    ({"act_clip": 0.9}, "--act-clip only applies with --abits"),
    ({"act_symmetric": False}, "--act-grid only applies with --abits"),  # the keyword from before the configs
    ({"kv_clip": 0.9}, "--kv-clip only applies with --kvbits"),
])
def test_bad_settings_change_nothing(kwargs, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=message):
        slimlm.quantize(model, method="rtn", calib=ids(), progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_transform_unsupported_by_the_architecture():
    with pytest.raises(SlimlmError, match="transform duquant supports"):
        slimlm.quantize(tiny_opt(), method="rtn", transform="duquant", calib=ids(), progress=False)


def test_transforms_compose_with_mixed_precision():
    model = outlier_llama()
    result = slimlm.quantize(model, method="rtn", avg_bits=3.5, allocation="fisher", group_size=None,
                             transform="duquant", abits=8, calib=ids(), progress=False)
    bits = {layer["bits"] for layer in result.manifest["layers"].values()}
    assert len(bits) > 1 and result.manifest["bits"] <= 3.5
    assert result.manifest["transform"]["sites"]
