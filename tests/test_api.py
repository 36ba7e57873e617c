"""The quantization and joint sparse+quantized pipelines on tiny random models."""
import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.core.architectures import linear_fqns
from slimlm.quant.grids import QuantGrid
from slimlm.quant.packing import packed_bytes
from tests.conftest import tiny_llama


def ids(n=8, seqlen=32, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def distinct_per_row(W):
    return max(torch.unique(row).numel() for row in W)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_puts_every_weight_on_its_grid(method):
    model = tiny_llama()
    result = slimlm.quantize(model, method=method, wbits=3, group_size=None, calib=ids(), progress=False)
    for fqn, lin in linear_fqns(model).items():
        assert distinct_per_row(lin.weight) <= 2 ** 3, fqn
    storage = result.manifest["storage"]
    expected = sum(packed_bytes(tuple(l.weight.shape), QuantGrid(3)) for l in linear_fqns(model).values())
    assert storage["quantized_linear_bytes_per_param"] == pytest.approx(
        expected / sum(l.weight.numel() for l in linear_fqns(model).values()))
    assert storage["bytes_per_param"] < 4  # float32 embeddings dominate the tiny model, still below 4 B


def test_gptq_reconstructs_better_than_rtn_end_to_end():
    logits = {}
    with torch.no_grad():
        reference = tiny_llama()(input_ids=ids(seed=1)).logits
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        slimlm.quantize(model, method=method, wbits=3, group_size=None, calib=ids(32), progress=False)
        with torch.no_grad():
            logits[method] = ((model(input_ids=ids(seed=1)).logits - reference) ** 2).mean().item()
    assert logits["gptq"] < logits["rtn"]


def test_rotated_8bit_model_keeps_its_function_and_runtime_reattaches(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        reference = model(input_ids=ids(2)).logits
    result = slimlm.quantize(model, method="rtn", wbits=8, group_size=None, rotate="hadamard", abits=8,
                             progress=False)
    with torch.no_grad():
        rotated = model(input_ids=ids(2)).logits
    assert (rotated - reference).abs().max() < 0.05 * reference.abs().max()
    assert result.manifest["rotation"]["online_down"]
    out = slimlm.save(model, None, tmp_path / "run", result)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    slimlm.apply_runtime(reloaded, result.manifest)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids(2)).logits, rotated, atol=1e-5)


@pytest.mark.parametrize("allocation", ["alphapruning", "fisher"])
def test_mixed_precision_average_bits(allocation):
    model = tiny_llama(layers=4)
    options = {"epsilon": 0.5} if allocation == "alphapruning" else {}
    result = slimlm.quantize(model, method="rtn", avg_bits=3.5, allocation=allocation, allocation_options=options,
                             group_size=None, calib=ids(), progress=False)
    layers = result.manifest["layers"]
    sizes = {f: l.weight.numel() for f, l in linear_fqns(model).items()}
    mean = sum(layers[f]["bits"] * sizes[f] for f in sizes) / sum(sizes.values())
    assert 3.0 < mean <= 3.5 + 1e-9
    assert len({v["bits"] for v in layers.values()}) > 1
    assert all(v["bits"] in (2, 3, 4, 5, 6, 8) for v in layers.values())


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_joint_sparse_quantized_keeps_masks_exactly(method):
    model = tiny_llama()
    slimlm.prune(model, method=method, pattern="2:4", wbits=4, group_size=None, calib=ids(), progress=False)
    for fqn, lin in linear_fqns(model).items():
        W = lin.weight
        assert ((W != 0).view(W.shape[0], -1, 4).sum(2) <= 2).all(), fqn
        assert distinct_per_row(W) <= 2 ** 4 + 1, fqn  # grid values (+ the pruned zeros)


def test_bad_quantization_input():
    with pytest.raises(slimlm.SlimlmError, match="bits must be an integer in 2..8"):
        slimlm.quantize(tiny_llama(), method="rtn", wbits=9, progress=False)
    with pytest.raises(slimlm.SlimlmError, match="unknown quantization method"):
        slimlm.quantize(tiny_llama(), method="awq", progress=False)


def test_bad_allocation_leaves_the_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match="unknown allocation"):
        slimlm.quantize(model, method="rtn", avg_bits=3.5, allocation="nope", rotate="hadamard", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fisher_plans_sparsegpt_with_its_own_tables_per_linear():
    from slimlm.allocate import errortable
    from slimlm.analysis.sensitivity import fisher_diagonal, fisher_sparsegpt_tables
    from slimlm.core.architectures import linear_fqns

    model, calib = tiny_llama(), ids()
    budgets = slimlm.plan_budgets(model, "fisher", 0.5, calib, progress=False, method="sparsegpt")
    fisher, _ = fisher_diagonal(model, calib, progress=False)  # all 8 windows: fewer than FISHER_WINDOWS
    tables = fisher_sparsegpt_tables(model, calib, fisher, progress=False)
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(model).items()}
    assert budgets == pytest.approx(errortable(tables, sizes, 0.5))
    assert budgets != pytest.approx(slimlm.plan_budgets(model, "fisher", 0.5, calib, progress=False))
