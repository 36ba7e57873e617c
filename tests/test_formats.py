"""Exports of saved runs: sparse bitmask / N:M storage and compressed-tensors pack-quantized, on a tiny Llama."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import slimlm
from slimlm.formats.codes import recover_grid
from slimlm.formats.compressed_tensors import export_compressed_tensors, load_compressed_tensors
from slimlm.formats.sparse import export_sparse, load_sparse, pack_mask, unpack_mask
from slimlm.quant.grids import QuantGrid, dequantize, quant_params, quantize
from tests.conftest import tiny_llama

CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))

RUNS = {
    "unstructured50": lambda m: slimlm.prune(m, method="wanda", sparsity=0.5, calib=CALIB, progress=False),
    "nm24": lambda m: slimlm.prune(m, method="wanda", pattern="2:4", calib=CALIB, progress=False),
    "nm24_w4": lambda m: slimlm.prune(m, method="sparsegpt", pattern="2:4", wbits=4, group_size=32, calib=CALIB,
                                      progress=False),
    "w4g32_sym": lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32),
    "w4g32_asym": lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32, symmetric=False),
    "w3_channel": lambda m: slimlm.quantize(m, method="rtn", wbits=3, group_size=None),
    "w4g32_gptq": lambda m: slimlm.quantize(m, method="gptq", wbits=4, group_size=32, calib=CALIB, progress=False),
    "mixed_bits": lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32, avg_bits=3.5,
                                            allocation="alphapruning", calib=CALIB, progress=False),
}
SPARSE = ["unstructured50", "nm24", "nm24_w4"]
QUANTIZED = ["w4g32_sym", "w4g32_asym", "w3_channel", "w4g32_gptq", "nm24_w4", "mixed_bits"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """name -> saved run folder, each built once (in float32) on first use."""
    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(name, dtype=torch.float32):
        key = f"{name}_{str(dtype)[6:]}"
        if key not in made:
            model = tiny_llama().to(dtype)
            made[key] = slimlm.save(model, None, root / key, RUNS[name](model))
        return made[key]
    return get


def _saved(folder):
    return load_file(folder / "model.safetensors")


def _assert_same(state, reference):
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


# ---------------------------------------------------------------- sparse

def test_pack_mask_is_numpy_packbits():
    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), axis=1))
    assert torch.equal(unpack_mask(packed, 21), mask)


@pytest.mark.parametrize("name,layout", [("unstructured50", "bitmask"), ("nm24", "nm"), ("nm24_w4", "nm")])
def test_sparse_round_trip_is_exact(run, tmp_path, name, layout):
    out = export_sparse(run(name), tmp_path / "sparse")
    _assert_same(load_sparse(out), _saved(run(name)))
    layers = json.loads((out / "sparse_config.json").read_text())["layers"]
    assert len(layers) == 14 and {v["layout"] for v in layers.values()} == {layout}
    assert (out / "config.json").is_file() and not (out / "slimlm.json").exists()


def test_sparse_export_is_smaller_than_dense(run, tmp_path):
    """50% unstructured in float32: 4 B/param dense -> 2 B values + 1/8 B mask per linear parameter."""
    src = run("unstructured50")
    out = export_sparse(src, tmp_path / "sparse")
    dense, sparse = (src / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    params = sum(t.numel() for t in _saved(src).values())
    config = json.loads((out / "sparse_config.json").read_text())
    linear_params = config["linear_dense_bytes"] / 4
    print(f"dense {dense / params:.3f} B/param, sparse {sparse / params:.3f} B/param overall; "
          f"linears {config['linear_sparse_bytes'] / linear_params:.3f} B/param")
    assert sparse < 0.7 * dense
    assert config["linear_sparse_bytes"] / linear_params <= 2.125 + 0.01


def test_nm_layout_needs_original_column_order(run, tmp_path):
    """A 2:4 run whose mask is 2:4 only after RIA's channel permutation falls back to the bitmask."""
    model = tiny_llama()
    result = slimlm.prune(model, method="ria", pattern="2:4", permute=True, calib=CALIB, progress=False)
    src = slimlm.save(model, None, tmp_path / "run", result)
    out = export_sparse(src, tmp_path / "sparse")
    _assert_same(load_sparse(out), _saved(src))
    layers = json.loads((out / "sparse_config.json").read_text())["layers"]
    assert "bitmask" in {v["layout"] for v in layers.values()}
    assert (out / "nm_permutations.safetensors").is_file()


def test_export_sparse_refuses_quantize_runs(run, tmp_path):
    with pytest.raises(slimlm.SlimlmError, match="needs a prune run"):
        export_sparse(run("w4g32_sym"), tmp_path / "out")


# ---------------------------------------------------------------- compressed-tensors

def test_recover_grid_reads_codes_back():
    W = torch.randn(8, 96, generator=torch.Generator().manual_seed(2))
    for grid in (QuantGrid(4, True, 32), QuantGrid(4, False, 32), QuantGrid(3, True, None), QuantGrid(8, False, 64)):
        scale, zero = quant_params(W, grid)
        Q = dequantize(quantize(W, scale, zero, grid), scale, zero, grid)
        codes, s, z, error = recover_grid(Q, grid)
        assert error == 0 and codes.min() >= grid.qmin and codes.max() <= grid.qmax
        gs = grid.group_size or 96
        per_column = (codes - z.repeat_interleave(gs, 1)[:, :96]).float() * s.repeat_interleave(gs, 1)[:, :96]
        assert torch.equal(per_column, Q)
    with pytest.raises(slimlm.SlimlmError, match="not on a 4-bit uniform grid"):
        recover_grid(W, QuantGrid(4, True, 32), "dense")


def _recover_group(v: torch.Tensor, grid: QuantGrid, exact: bool):
    """recover_grid's rule for one group, written as a plain loop: (signed codes, scale, relative error) of the
    first j whose step d/j (d the smallest nonzero |v|) puts every value on the grid with a scale, tried from
    v/k at the largest |k| outwards by ulps, that reproduces the group; None if no j does."""
    from slimlm.formats.codes import SCALE_ULPS

    kmax, eps = max(-grid.qmin, grid.qmax), torch.finfo(v.dtype).eps
    if not (v != 0).any():
        return torch.zeros(v.shape, dtype=torch.int64), torch.tensor(1.0, dtype=v.dtype), 0.0
    d, v64 = v[v != 0].abs().min().double(), v.double()
    for j in range(1, kmax + 1):
        r = v64 / (d / j)
        k = r.round()
        lo, hi = k.min().item(), k.max().item()
        fits = grid.qmin <= lo and hi <= grid.qmax if grid.symmetric else hi + max(0.0, -lo) <= grid.qmax
        if (r - k).abs().max() > 2 * kmax * eps or not fits:
            continue
        i = int(k.abs().argmax())
        up = down = (v64[i] / k[i]).to(v.dtype)
        scales = [up]
        for _ in range(SCALE_ULPS):
            up, down = torch.nextafter(up, up.new_tensor(math.inf)), torch.nextafter(down, down.new_tensor(0.0))
            scales += [up, down]
        errors = [((k.to(v.dtype) * s).double() - v64).abs().max().item() for s in scales]
        best = errors.index(min(errors))  # the first of equal errors
        error = errors[best] / v64.abs().max().item()
        if error == 0 or (not exact and error <= SCALE_ULPS * eps):
            return k.long(), scales[best], error
    return None


def _on_grid(grid: QuantGrid, rows: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """Weights on ``grid``: random codes times random scales per group. Where the grid holds them, some first
    groups take codes from ±2, ±3 only (smallest nonzero 2·s: the step is d/2) or ±3, ±4 (d/3); one row is
    zero from its second group on."""
    g = torch.Generator().manual_seed(grid.bits)
    gs = grid.group_size or width
    codes = torch.randint(grid.qmin, grid.qmax + 1, (rows, width), generator=g)
    zero = 0 if grid.symmetric else torch.randint(0, grid.qmax + 1, (rows, 1), generator=g)
    signed = codes - zero
    for first_rows, pair in ((slice(0, None, 3), (2, 3)), (slice(1, None, 3), (3, 4))):
        if (grid.qmax if grid.symmetric else grid.qmax // 2) >= pair[1]:
            pick = torch.randint(0, 4, signed[first_rows, :gs].shape, generator=g)
            signed[first_rows, :gs] = torch.tensor([pair[0], pair[1], -pair[0], -pair[1]])[pick]
    signed[2, gs:] = 0
    scales = torch.rand(rows, -(-width // gs), generator=g).repeat_interleave(gs, 1)[:, :width] + 0.01
    return (signed.float() * scales).to(dtype)


@pytest.mark.parametrize("grid,dtype,exact", [(QuantGrid(4, True, 32), torch.float32, True),
                                              (QuantGrid(4, False, 32), torch.float32, True),
                                              (QuantGrid(3, True, None), torch.float32, True),
                                              (QuantGrid(8, False, 64), torch.float32, True),
                                              (QuantGrid(3, True, 16), torch.bfloat16, False),
                                              (QuantGrid(2, False, 16), torch.float16, False)])
def test_recover_grid_matches_the_rule_group_by_group(grid, dtype, exact):
    W = _on_grid(grid, 9, 96, dtype)
    codes, scale, zero, error = recover_grid(W, grid, exact=exact)
    gs = grid.group_size or 96
    worst = 0.0
    for row in range(9):
        for group in range(scale.shape[1]):
            k, s, e = _recover_group(W[row, group * gs:(group + 1) * gs], grid, exact)
            got = codes[row, group * gs:(group + 1) * gs].long() - zero[row, group]
            assert torch.equal(got, k) and scale[row, group] == s, (row, group)
            worst = max(worst, e)
    assert error == worst
    off = W.clone()
    off[4, 5] = off[4, 5] * 1.37 + 1e-3  # one value off the grid: that group has no representation
    if _recover_group(off[4, :gs], grid, exact) is None:
        with pytest.raises(slimlm.SlimlmError, match="group 0"):
            recover_grid(off, grid, exact=exact)


@pytest.mark.parametrize("name", QUANTIZED)
def test_compressed_tensors_round_trip_is_exact(run, tmp_path, name):
    out = export_compressed_tensors(run(name), tmp_path / "ct")
    _assert_same(load_compressed_tensors(out), _saved(run(name)))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    groups = list(qc["config_groups"].values())
    assert len(groups) == (2 if name == "mixed_bits" else 1)
    weights = groups[0]["weights"]
    assert weights["strategy"] == ("channel" if name == "w3_channel" else "group")
    assert weights["symmetric"] == (name != "w4g32_asym")
    tensors = load_file(out / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight_packed"].dtype == torch.int32 and f"{q}.weight" not in tensors
    assert tensors[f"{q}.weight_shape"].tolist() == [64, 64]
    assert tensors[f"{q}.weight_scale"].shape == (64, 1 if name == "w3_channel" else 2)
    assert (f"{q}.weight_zero_point" in tensors) == (name == "w4g32_asym")
    if name == "w4g32_asym":
        assert tensors[f"{q}.weight_zero_point"].shape == (8, 2)  # 64 4-bit zero points packed along rows


def test_export_compressed_tensors_refuses_prune_runs(run, tmp_path):
    with pytest.raises(slimlm.SlimlmError) as err:
        export_compressed_tensors(run("unstructured50"), tmp_path / "out")
    assert "\n" not in str(err.value) and "use export_sparse" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_exports_never_overwrite(run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for export, name in ((export_compressed_tensors, "w4g32_sym"), (export_sparse, "unstructured50")):
        with pytest.raises(slimlm.SlimlmError, match="already exists"):
            export(run(name), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_online_rotation_is_refused(tmp_path):
    model = tiny_llama()
    src = slimlm.save(model, None, tmp_path / "run", slimlm.quantize(model, method="rtn", wbits=4, group_size=32,
                                                                      rotate="hadamard"))
    with pytest.raises(slimlm.SlimlmError, match="online down_proj"):
        export_compressed_tensors(src, tmp_path / "out")


def test_half_precision_needs_exact_false(run, tmp_path):
    """bf16 runs hold fp32 grid values rounded to bf16; no bf16 scale reproduces all of them bit for bit."""
    src = run("w4g32_sym", torch.bfloat16)
    with pytest.raises(slimlm.SlimlmError, match="exact=False"):
        export_compressed_tensors(src, tmp_path / "strict")
    out = export_compressed_tensors(src, tmp_path / "loose", exact=False)
    record = json.loads((out / "slimlm_export.json").read_text())
    assert not record["exact"] and record["max_relative_error"] <= 2 * torch.finfo(torch.bfloat16).eps
    state, saved = load_compressed_tensors(out), _saved(src)
    for k, v in saved.items():
        assert state[k].dtype == v.dtype
        torch.testing.assert_close(state[k], v, rtol=0, atol=2 * torch.finfo(torch.bfloat16).eps * v.abs().max())


# ---------------------------------------------------------------- against the compressed-tensors package

def test_pack_int_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    from slimlm.quant.packing import pack_int

    for bits in range(2, 9):
        codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 77),
                              generator=torch.Generator().manual_seed(bits))
        assert torch.equal(pack_int(codes, bits, signed=True), helpers.pack_to_int32(codes.to(torch.int8), bits))


@pytest.mark.parametrize("name", QUANTIZED)
def test_compressed_tensors_package_decompresses_our_export(run, tmp_path, name):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = export_compressed_tensors(run(name), tmp_path / "ct")
    config = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    schemes = {t: scheme for scheme in config.config_groups.values() for t in scheme.targets}
    tensors, saved = load_file(out / "model.safetensors"), _saved(run(name))
    fqns = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    assert len(fqns) == 14
    for fqn in fqns:
        local = {k.removeprefix(f"{fqn}."): v for k, v in tensors.items() if k.startswith(f"{fqn}.weight_")}
        weight = PackedQuantizationCompressor.decompress(local, schemes.get(fqn) or schemes["Linear"])["weight"]
        assert torch.equal(weight, saved[f"{fqn}.weight"]), fqn


def test_transformers_loads_our_export(run, tmp_path):
    """transformers + compressed-tensors dequantize the export on load to exactly our weights."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = export_compressed_tensors(run("w4g32_asym"), tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    for k, v in _saved(run("w4g32_asym")).items():
        assert torch.equal(state[k], v), k
