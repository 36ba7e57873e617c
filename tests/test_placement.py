"""--device-map (core.placement): the split of a block over devices, the dispatched run against the plain one."""
import copy

import pytest
import torch
from torch import nn

import slimlm
from slimlm.cli import main
from slimlm.core.architectures import decoder_blocks
from slimlm.core.placement import _cost, _owners, plan, spread_over
from tests.conftest import tiny_llama


def test_plan_cuts_the_block_into_contiguous_balanced_pieces():
    block = decoder_blocks(tiny_llama())[0]
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("cuda", 5)]
    device_map = plan(block, devices, hessian=True)
    owners = _owners(block)
    assert list(device_map) == [name for name, _ in owners]  # every module that holds tensors, in order
    order = [[str(d) for d in devices].index(device_map[name]) for name, _ in owners]
    assert order == sorted(order) and set(order) == {0, 1, 2}  # contiguous pieces, each device used
    costs = [_cost(m, True) for _, m in owners]
    pieces = [sum(c for c, k in zip(costs, order) if k == d) for d in range(3)]
    assert max(pieces) - min(pieces) <= 2 * max(costs)  # balanced up to the indivisible modules
    assert _cost(block.mlp.down_proj, True) == 4 * (128 * 64 + 2 * 128 ** 2)  # weights + Hessian and its copy
    assert _cost(block.input_layernorm, True) == 4 * 64


def test_spread_run_equals_single_device_run_and_leaves_no_hooks():
    model = tiny_llama()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    plain, spread = copy.deepcopy(model), copy.deepcopy(model)
    slimlm.quantize(plain, method="gptq", wbits=4, calib=calib, progress=False)
    with spread_over("cpu,cpu"):
        result = slimlm.quantize(spread, method="gptq", wbits=4, calib=calib, progress=False)
    assert result.manifest["device"] == "cpu,cpu"
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), spread.state_dict().values()))
    for block in decoder_blocks(spread):
        assert "hf_device_map" not in vars(block) and "to" not in vars(block)
        assert not any(hasattr(m, "_hf_hook") for m in block.modules())
        assert all(p.device.type == "cpu" for p in block.parameters())


@pytest.mark.parametrize("spec,message", [
    ("auto", "--device-map auto spreads a block over GPUs, and none is visible"),
    ("cuda:7", "--device-map: cuda:7 is not a visible GPU"),
    ("gpu0", "--device-map: "),
])
def test_bad_device_map_is_one_line_and_writes_nothing(capsys, tmp_path, tiny_folder, calib, spec, message):
    if torch.cuda.device_count() > 7 or (spec == "auto" and torch.cuda.is_available()):
        pytest.skip("this machine has the GPUs the spec names")
    code = main(["quantize", str(tiny_folder), "--method", "gptq", "--calib", calib, "--nsamples", "2", "--seqlen",
                 "16", "--out", str(tmp_path / "out"), "--device-map", spec, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_data_free_methods_refuse_a_device_map():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with spread_over("cpu,cpu"), pytest.raises(slimlm.SlimlmError, match="data-free methods"):
        slimlm.quantize(model, method="rtn", wbits=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_block_over_two_gpus_matches_one_gpu():
    model = tiny_llama()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    one, two = copy.deepcopy(model), copy.deepcopy(model)
    slimlm.quantize(one, method="gptq", wbits=4, calib=calib, device="cuda:0", progress=False)
    with spread_over("cuda:0,cuda:1"):
        slimlm.quantize(two, method="gptq", wbits=4, calib=calib, progress=False)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert a.device.type == "cpu" and b.device.type == "cpu", name
        if isinstance(dict(one.named_modules()).get(name.rpartition(".")[0]), nn.Linear):
            assert (a != b).float().mean() < 0.01, name  # GPU kernels may round a few weights differently
