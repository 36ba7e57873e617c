"""Every architecture slimlm lists is one it compresses: a tiny random model of each is pruned (every linear of its
blocks at the target), saved, and reloaded by plain transformers with the same logits; others are refused."""
import pytest
import torch

import slimlm
from slimlm.core.architectures import ADAPTERS, linear_fqns
from slimlm.errors import SlimlmError

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {"head_dim": 16} if model_type.startswith("gemma") else {}
    config = AutoConfig.for_model(model_type, **SMALL, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", ["mistral", "gemma", "gemma2", "phi3"])
def test_prune_save_reload_keeps_the_logits(model_type, tmp_path):
    from transformers import AutoModelForCausalLM

    assert model_type in ADAPTERS
    model = tiny(model_type)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    result = slimlm.prune(model, method="wanda", sparsity=0.5, calib=ids, progress=False)
    for fqn, linear in linear_fqns(model).items():
        assert (linear.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01), fqn
    assert result.manifest["sparsity"] == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = slimlm.save(model, None, tmp_path / model_type, result)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, before)


def test_a_mixture_of_experts_model_is_refused_not_left_uncompressed():
    with pytest.raises(SlimlmError, match="unsupported architecture 'mixtral'"):
        slimlm.prune(tiny("mixtral"), method="magnitude", sparsity=0.5, progress=False)
