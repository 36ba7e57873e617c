"""GGUF export: every tensor read back with gguf's own reader and dequantizer equals the run bit for bit,
transformers loads the file to the run's logits, the tokenizer metadata matches a llama.cpp-converted file,
refusals are one line."""
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import slimlm
from slimlm.cli import main
from slimlm.gguf.export import export_gguf
from slimlm.gguf.writer import rope_interleave
from slimlm.quant.grids import QuantGrid, fake_quant, quant_params
from tests.conftest import tiny_llama, tiny_opt

F16 = "float16"
RUNS = {  # name -> (make the run, GGUF type expected for the block linears)
    "dense": (lambda m: slimlm.prune(m, method="magnitude", sparsity=0.0), "F32"),
    "q8_0": (lambda m: slimlm.quantize(m, method="rtn", wbits=8, group_size=32, scale_dtype=F16), "Q8_0"),
    "q4_0": (lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32, scale_dtype=F16), "Q4_0"),
    "q4_1": (lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32, symmetric=False, scale_dtype=F16),
             "Q4_1"),
    # a group of 64 is two blocks with one scale; 3-bit codes fit Q4_0's; pruned zeros stay exact
    "w3_g64": (lambda m: slimlm.quantize(m, method="rtn", wbits=3, group_size=64, scale_dtype=F16), "Q4_0"),
    "nm24_w4": (lambda m: slimlm.prune(m, method="magnitude", pattern="2:4", wbits=4, group_size=32,
                                       scale_dtype=F16), "Q4_0"),
    "w4_fp32_scales": (lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=32), None),
    "w4_g16": (lambda m: slimlm.quantize(m, method="rtn", wbits=4, group_size=16, scale_dtype=F16), None),
}
HEADS = {"attn_q": 4, "attn_k": 2}  # tiny_llama: 4 heads, 2 KV heads


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("runs"), {}

    def get(name):
        if name not in made:
            model = tiny_llama()
            made[name] = slimlm.save(model, None, root / name, RUNS[name][0](model))
        return made[name]
    return get


def _undo_rope_order(name: str, W: np.ndarray) -> np.ndarray:
    """transformers' own inverse of llama.cpp's Q/K row order, so the test does not trust ours."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    return processor.process(W, name).weights


def _gguf_state(path) -> dict[str, tuple[str, torch.Tensor]]:
    """GGUF name -> (type name, float32 weight in HF row order) via gguf.GGUFReader + gguf.quants.dequantize."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, torch.from_numpy(_undo_rope_order(
        t.name, gguf.quants.dequantize(t.data, t.tensor_type)).copy())) for t in reader.tensors}


def _hf_name(gguf_name: str) -> str:
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    hf = {mapping.get_name(n): n for n in ["model.embed_tokens", "model.norm", "lm_head"] + [
        f"model.layers.{i}.{leaf}" for i in range(2) for leaf in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]}
    return hf[gguf_name.removesuffix(".weight")] + ".weight"


# ---------------------------------------------------------------- pieces

def test_float16_scales_keep_the_range_and_make_gguf_scales_exact():
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(0)) * 0.02
    W[0, :32] = 1e-6  # a tiny group: its scale is clamped to float16's smallest normal, not flushed to zero
    for symmetric in (True, False):
        plain, _ = quant_params(W, QuantGrid(4, symmetric, 32))
        grid = QuantGrid(4, symmetric, 32, scale_dtype=F16)
        scale, zero = quant_params(W, grid)
        offset = zero * scale  # GGUF Q4_1 stores m = -zero·scale in float16 too
        assert torch.equal(scale.half().float(), scale) and torch.equal(offset.half().float(), offset)
        assert (scale >= plain).all() and (scale[1:] <= plain[1:] * (1 + 2.0 ** -6)).all()
        assert ((fake_quant(W, grid) - W).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-9).all()
    with pytest.raises(slimlm.SlimlmError, match="scale_dtype"):
        QuantGrid(4, scale_dtype="bfloat16")


def test_rope_interleave_puts_rotated_pairs_side_by_side():
    """Head h's HF rows [a_0..a_{d/2-1}, b_0..b_{d/2-1}] (rotate_half pairs a_i, b_i) become a_0 b_0 a_1 b_1 ..."""
    W = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)
    out = rope_interleave(W, heads=2)
    for h in range(2):
        for i in range(4):
            assert torch.equal(out[h * 8 + 2 * i], W[h * 8 + i])
            assert torch.equal(out[h * 8 + 2 * i + 1], W[h * 8 + 4 + i])
    assert np.array_equal(_undo_rope_order("blk.0.attn_k.weight", rope_interleave(W, 2).numpy()), W.numpy())


# ---------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("name", ["dense", "q8_0", "q4_0", "q4_1", "w3_g64", "nm24_w4"])
def test_every_tensor_reads_back_bit_for_bit(run, tmp_path, name):
    src = run(name)
    path = export_gguf(src, tmp_path / "m.gguf")
    saved, state = load_file(src / "model.safetensors"), _gguf_state(path)
    assert {_hf_name(n) for n in state} == set(saved)
    for gguf_name, (qtype, W) in state.items():
        hf = _hf_name(gguf_name)
        is_linear = "layers" in hf and saved[hf].dim() == 2
        assert qtype == (RUNS[name][1] if is_linear else "F32"), gguf_name
        assert W.shape == saved[hf].shape and torch.equal(W, saved[hf]), gguf_name
    reader = gguf.GGUFReader(path)
    record = json.loads(reader.fields["slimlm.export"].contents())
    assert record["exact"] and record["max_abs_deviation"] == 0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    q = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")  # (64, 128): 4 blocks per row
    bytes_per_block = {"F32": 128, "Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[RUNS[name][1]]
    assert q.n_bytes == 64 * 4 * bytes_per_block


@pytest.mark.parametrize("name", ["dense", "q4_1"])
def test_transformers_loads_the_file_to_the_same_logits(run, tmp_path, name):
    from transformers import AutoModelForCausalLM

    src = run(name)
    path = export_gguf(src, tmp_path / "out")  # a folder holding model.gguf
    assert path == tmp_path / "out" / "model.gguf"
    ours = AutoModelForCausalLM.from_pretrained(src).eval()
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, theirs(tokens).logits)


def test_float_types_on_request(run, tmp_path):
    """f16 of a dense run: every matrix rounded to float16 once, norms F32; the record gives the deviation."""
    path = export_gguf(run("dense"), tmp_path / "m.gguf", gguf_type="f16")
    saved, state = load_file(run("dense") / "model.safetensors"), _gguf_state(path)
    for gguf_name, (qtype, W) in state.items():
        reference = saved[_hf_name(gguf_name)]
        assert qtype == ("F16" if reference.dim() == 2 else "F32")
        assert torch.equal(W, reference.half().float() if reference.dim() == 2 else reference)
    deviation = json.loads(gguf.GGUFReader(path).fields["slimlm.export"].contents())["max_abs_deviation"]
    assert deviation == max((saved[n].half().float() - saved[n]).abs().max().item() for n in saved)


def test_half_precision_runs_keep_their_dtype(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    src = slimlm.save(model, None, tmp_path / "run", slimlm.prune(model, method="magnitude", sparsity=0.5))
    saved, state = load_file(src / "model.safetensors"), _gguf_state(export_gguf(src, tmp_path / "m.gguf"))
    for gguf_name, (qtype, W) in state.items():
        reference = saved[_hf_name(gguf_name)]
        assert qtype == ("BF16" if reference.dim() == 2 else "F32") and torch.equal(W, reference.float())


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def smollm_export(tmp_path_factory, builtin_folder):
    """(tokenizer, exported file): a tiny llama with the built-in model's tokenizer, made 'from' the built-in model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_folder)
    model = tiny_llama(vocab=49152)
    result = slimlm.prune(model, method="magnitude", sparsity=0.0)
    result.manifest["model"] = "smollm2-135m"
    root = tmp_path_factory.mktemp("smol")
    return tokenizer, export_gguf(slimlm.save(model, tokenizer, root / "run", result), root / "m.gguf")


def test_tokenizer_metadata_matches_llama_cpps_conversion(smollm_export):
    """Every tokenizer.* field equals the one llama.cpp's converter wrote into the built-in model's GGUF
    (both read with transformers' own GGUF parser, not the gguf package that wrote ours)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from slimlm.core.models import builtin_gguf

    arrays = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    ours, _ = read_gguf_metadata(str(smollm_export[1]), arrays)
    reference, _ = read_gguf_metadata(str(builtin_gguf("smollm2-135m")), arrays)
    keys = [k for k in reference if k.startswith("tokenizer.")]
    assert {"tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.ggml.token_type"} <= set(keys)
    for key in keys:
        same = np.array_equal(ours[key], reference[key]) if key.endswith("token_type") else ours[key] == reference[key]
        assert same, key


def test_metadata_reader_matches_transformers_reader(smollm_export, tmp_path):
    """gguf.metadata.read_metadata (which export uses instead of the slow gguf.GGUFReader) gives every
    key as transformers' GGUF parser reads it, on llama.cpp's file and on ours; a cut file is a SlimlmError."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    from slimlm.core.models import builtin_gguf
    from slimlm.gguf.metadata import read_metadata

    for path in (str(builtin_gguf("smollm2-135m")), str(smollm_export[1])):
        keys = list(read_gguf_metadata(path)[0])
        reference, _ = read_gguf_metadata(path, keys)  # string arrays are read only when named
        ours = read_metadata(path, keys + ["no.such.key"])
        assert list(ours) == keys
        for key in keys:
            assert np.array_equal(ours[key], reference[key]) if isinstance(ours[key], list) else \
                ours[key] == reference[key], key
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_export[1].read_bytes()[:5000])
    with pytest.raises(slimlm.SlimlmError, match="cannot read the GGUF metadata"):
        read_metadata(cut, ["slimlm.export"])


def test_transformers_builds_the_same_tokenizer(smollm_export):
    from transformers import AutoTokenizer

    tokenizer, path = smollm_export
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "<|im_start|>user\nPrices rose 12.5% in 2024 -- naïve café, tabs\tand  spaces.<|im_end|>"
    assert theirs(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (1, 2, 2)


# ---------------------------------------------------------------- refusals (CLI: one line, exit 2, nothing written)

def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what making the run printed
    assert main([*argv, "--quiet"]) == 2  # a refusal found while encoding would follow the progress bar
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimlm: error: ") and "\n" not in err
    return err


def test_refusals(run, tmp_path, capsys):
    out = str(tmp_path / "x.gguf")
    err = _cli_error(capsys, "export", str(run("w4_fp32_scales")), "--format", "gguf", "--out", out)
    assert "--scale-dtype float16" in err and "--inexact" in err
    err = _cli_error(capsys, "export", str(run("w4_g16")), "--format", "gguf", "--out", out)
    assert "no GGUF block type holds" in err and "group 16" in err and "Q4_0" in err
    err = _cli_error(capsys, "export", str(run("q4_1")), "--format", "gguf", "--gguf-type", "q4_0", "--out", out)
    assert "Q4_0 cannot hold" in err
    err = _cli_error(capsys, "export", str(run("dense")), "--format", "gguf", "--gguf-type", "q8_0", "--out", out)
    assert "needs a quantized run" in err
    model = tiny_opt()
    opt = slimlm.save(model, None, tmp_path / "opt", slimlm.prune(model, method="magnitude", sparsity=0.5))
    assert "llama-architecture" in _cli_error(capsys, "export", str(opt), "--format", "gguf", "--out", out)
    assert list(tmp_path.glob("*.gguf*")) == [] and not list(tmp_path.glob(".x.gguf*"))
    taken = tmp_path / "taken.gguf"
    taken.write_text("mine")
    err = _cli_error(capsys, "export", str(run("dense")), "--format", "gguf", "--out", str(taken))
    assert "already exists" in err
    assert taken.read_text() == "mine"


def test_inexact_and_dequantized_exports(run, tmp_path, capsys):
    """fp32 scales: --inexact rounds them to float16 (deviation reported, tiny); a group of 16 fits no block
    type but exports dequantized with --gguf-type f32, exactly."""
    src = run("w4_fp32_scales")
    assert main(["export", str(src), "--format", "gguf", "--inexact", "--out", str(tmp_path / "a.gguf")]) == 0
    deviation = json.loads(capsys.readouterr().out)["max_abs_deviation"]
    saved = load_file(src / "model.safetensors")
    largest = max(v.abs().max().item() for v in saved.values())
    assert 0 < deviation < largest * 2.0 ** -10
    assert main(["export", str(run("w4_g16")), "--format", "gguf", "--gguf-type", "f32",
                 "--out", str(tmp_path / "b.gguf")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["max_abs_deviation"] == 0 and printed["bytes"] == (tmp_path / "b.gguf").stat().st_size


# ---------------------------------------------------------------- the built-in model

@pytest.mark.slow
@pytest.mark.parametrize("asym", [False, True])
def test_builtin_model_q4_gguf_has_the_runs_perplexity(tmp_path, monkeypatch, capsys, data_dir, asym):
    """`slimlm quantize ... --scale-dtype float16` -> `export --format gguf` (Q4_0 / Q4_1) -> `slimlm eval file.gguf`
    gives the run's perplexity exactly."""
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))  # the .gguf's float32 conversion lands here
    run_dir, path = tmp_path / "run", tmp_path / "run.gguf"
    grid = ["--wbits", "4", "--group-size", "32", "--scale-dtype", "float16"] + (["--asym"] if asym else [])
    assert main(["quantize", "smollm2-135m", "--method", "rtn", *grid, "--out", str(run_dir), "--quiet"]) == 0
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(path)]) == 0
    capsys.readouterr()
    perplexity = {}
    for model in (run_dir, path):
        assert main(["eval", str(model), "--eval-windows", "1", "--eval-seqlen", "512", "--data-dir", data_dir,
                     "--quiet"]) == 0
        perplexity[model] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert perplexity[run_dir] == perplexity[path]
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types == {"F32", "Q4_1" if asym else "Q4_0"}


def test_a_damaged_gguf_file_is_named_as_such_in_one_line(tmp_path):
    """Before any conversion or llama.cpp run: not a GGUF file, a header cut short, tensor data cut short."""
    from slimlm.cli import main
    from slimlm.core.models import builtin_gguf, model_source

    data = builtin_gguf("smollm2-135m").read_bytes()
    cases = {"junk.gguf": (b"hello world" * 100, "is not a GGUF file"),
             "head.gguf": (data[:5000], "is truncated or damaged"),
             "half.gguf": (data[:len(data) // 2], f"is truncated: its tensor data ends at byte {len(data):,}")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(slimlm.SlimlmError, match=message):
            model_source(str(tmp_path / name))
        for engine in ("transformers", "llama.cpp"):
            assert main(["eval", str(tmp_path / name), "--engine", engine, "--eval-windows", "1"]) == 2
