"""IntactKV: prepending the full-precision pivot cache equals running the pivots as part of the input."""
import pytest
import torch

from tests.conftest import LLAMA_FAMILY, tiny_llama
from slimlm.errors import SlimlmError
from slimlm.hooks import intactkv
from slimlm.hooks.kvcache import kv_specs_, quantize_kv_


class Tokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 100 for c in text]}


def ids(n=2, T=20):
    return torch.randint(3, 128, (n, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode,prefix", [("bos", None), ("prefix", "be brief")])
@torch.no_grad()
def test_unquantized_model_with_intact_pivots_equals_the_plain_model(mode, prefix, arch):
    model = LLAMA_FAMILY[arch]()
    pivots = intactkv.pivot_tokens(Tokenizer(), mode, prefix)
    assert pivots[0] == 1 and len(pivots) == (1 if mode == "bos" else 9)
    x = ids()
    full = model(input_ids=torch.cat([torch.tensor([pivots] * 2), x], 1)).logits[:, len(pivots):]
    intactkv.attach_(model, intactkv.pivot_cache(model, pivots))
    assert torch.allclose(model(input_ids=x).logits, full, atol=1e-5)
    intactkv.detach_(model)
    assert not torch.allclose(model(input_ids=x).logits, full, atol=1e-3)


@torch.no_grad()
def test_pivot_entries_stay_exact_under_kv_quantization():
    model = tiny_llama()
    cache = intactkv.pivot_cache(model, [1, 5, 6])
    quantize_kv_(model, 2)
    intactkv.attach_(model, cache)
    assert all(spec.intact == 3 for spec in kv_specs_(model))
    seen = []
    spec = kv_specs_(model)[0]
    original = spec._quantize
    spec._quantize = lambda t, *clip: seen.append((t, original(t, *clip))) or seen[-1][1]
    model(input_ids=ids(1))
    key_in, key_out = seen[0]
    assert key_in.shape[-2] == 3 + 20
    assert torch.equal(key_out[..., :3, :], cache[0][0]) and not torch.equal(key_out[..., 3:, :], key_in[..., 3:, :])


def test_tensors_round_trip_and_bad_inputs():
    model = tiny_llama()
    cache = intactkv.pivot_cache(model, [1])
    back = intactkv.from_tensors(intactkv.to_tensors(cache))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(back, cache))
    with pytest.raises(SlimlmError, match="prefix text"):
        intactkv.pivot_tokens(Tokenizer(), "prefix")
    with pytest.raises(SlimlmError, match="prefix text"):
        intactkv.pivot_tokens(Tokenizer(), "bos", "hello")
    with pytest.raises(SlimlmError, match="unknown IntactKV mode"):
        intactkv.pivot_tokens(Tokenizer(), "eos")
    with pytest.raises(SlimlmError, match="has 1 layers"):
        intactkv.attach_(model, cache[:1])


def test_a_tokenizer_without_bos_keeps_the_prefix_alone():
    """Qwen's tokenizers have no BOS token: the prefix text is the pivot, and mode bos says to use it."""
    class NoBos(Tokenizer):
        bos_token_id = None

    with pytest.raises(SlimlmError, match="no BOS token; use mode prefix"):
        intactkv.pivot_tokens(NoBos(), "bos")
    assert intactkv.pivot_tokens(NoBos(), "prefix", "be brief") == intactkv.pivot_tokens(Tokenizer(), "prefix",
                                                                                         "be brief")[1:]


def test_calibration_moves_the_quantized_outputs_toward_the_full_precision_ones():
    import slimlm

    model = tiny_llama()
    windows = ids(4, 16)
    result = slimlm.quantize(model, Tokenizer(), method="rtn", wbits=3, abits=4, kvbits=3, group_size=None,
                             intact_kv="bos", calib=windows, progress=False)
    plain = result.tensors["runtime.safetensors"]
    fp = tiny_llama()
    reference = intactkv.reference_outputs(fp, windows, intactkv.pivot_cache(fp, [1]))

    def error(entries):
        intactkv.attach_(model, entries)
        with torch.no_grad():
            out = model(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states[1:]
        return sum(((h - r) ** 2).mean().item() for h, r in zip(out, reference))
    before = error(intactkv.from_tensors(plain))
    trained = intactkv.calibrate_(model, reference, windows, intactkv.from_tensors(plain), steps=40, lr=1e-2,
                                  progress=False)
    assert error(trained) < before


def test_generation_from_the_pivot_cache_equals_generation_after_the_pivots():
    model = tiny_llama()
    x = ids(1, 6)
    reference = model.generate(torch.cat([torch.tensor([[1]]), x], 1), max_new_tokens=5, do_sample=False)
    intactkv.attach_(model, intactkv.pivot_cache(model, [1]))
    assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=False)[0], reference[0, 1:])
