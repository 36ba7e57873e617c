"""FlatQuant: factor sizes as defined, invertible factors, the fixed transforms keep the function, training helps."""
import pytest
import torch

from slimlm.core.engine import capture_inputs
from slimlm.quant.grids import QuantGrid
from slimlm.transforms.flatquant import Affine, FlatBlock, finalize_, kron_dims, train_block_
from tests.conftest import LLAMA_FAMILY, tiny_llama


@pytest.mark.parametrize("n,dims", [(576, (24, 24)), (896, (28, 32)), (1536, (32, 48)), (4096, (64, 64)),
                                    (8960, (80, 112)), (11008, (86, 128)), (64, (8, 8)), (7, (1, 7))])
def test_kron_dims_are_the_most_balanced_factors(n, dims):
    assert kron_dims(n) == dims


def test_factors_stay_invertible_with_an_analytic_inverse_transpose():
    P = Affine(6, seed=0)
    with torch.no_grad():
        for p in (P.su, P.sv):
            p.normal_(0, 0.5)
        P.sigma.uniform_(0.3, 3)
    eye = torch.eye(6)
    assert torch.allclose(P.matrix() @ P.matrix(inverse_transpose=True).T, eye, atol=1e-5)


def block_data(model, n=4):
    ids = torch.randint(0, 128, (n, 16), generator=torch.Generator().manual_seed(0))
    captured = capture_inputs(model, ids, n, "cpu")
    block = model.model.layers[0]
    args, kwargs = captured.call_args[0][n]
    with torch.no_grad():
        y = block(captured.hidden, *args, **kwargs)
    hidden_max = captured.hidden.abs().amax((0, 1))  # a stand-in for the inputs' abs-max: any positive scale
    absmax = {"self_attn.q_proj": hidden_max, "mlp.gate_proj": hidden_max,
              "mlp.down_proj": torch.ones(model.config.intermediate_size)}
    return block, captured.hidden, y[0] if isinstance(y, tuple) else y, captured.call_args[0], absmax


@pytest.mark.parametrize("arch", LLAMA_FAMILY)
def test_fixed_transforms_keep_the_full_precision_function(arch):
    model = LLAMA_FAMILY[arch]()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    block, _, _, _, absmax = block_data(model)
    flat = FlatBlock(block, absmax, seed=0)
    with torch.no_grad():
        for name, p in flat.named_parameters():
            if name.startswith("lwc"):
                p.fill_(30.0)  # σ(30) = 1: no clipping, so only the transforms act
            elif name.endswith("sigma") or name.startswith("diag"):
                p.uniform_(0.5, 2.0)
            elif name.endswith((".su", ".sv")):
                p.normal_(0, 0.3)
    finalize_(block, flat, kvbits=None)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4)


def test_training_lowers_the_block_error_on_its_calibration_data():
    model = tiny_llama()
    block, x, y, call_args, absmax = block_data(model)
    flat = FlatBlock(block, absmax, seed=0)
    first, last = train_block_(block, flat, x, y, call_args, QuantGrid(3), 4, True, 4, epochs=6, batch=2)
    assert last < first


@pytest.mark.parametrize("transform", [["--transform", "flatquant"], ["--transform", "duquant", "--lwc"]])
def test_the_default_group_size_trains_on_rows_it_does_not_divide(tiny_folder, calib, tmp_path, transform):
    """The README's W4A4KV4 command with the default --group-size 128 on 64-wide rows: one partial group per
    row, as RTN and GPTQ quantize it (it used to crash in the training path)."""
    from slimlm.cli import main

    code = main(["quantize", str(tiny_folder), "--wbits", "4", "--abits", "4", "--kvbits", "4", *transform,
                 "--epochs", "1", "--calib", calib, "--nsamples", "2", "--seqlen", "16", "--out",
                 str(tmp_path / "run"), "--quiet"])
    assert code == 0 and (tmp_path / "run" / "slimlm.json").is_file()
