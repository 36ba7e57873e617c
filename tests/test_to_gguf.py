"""slimlm gguf / slimlm.to_gguf on a tiny Llama: the file holds what the model now computes, sizes are met, and bad
input gets one line, a non-zero exit and nothing written."""
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from slimlm.quant.gguf_sizing import parse_size, solve
from slimlm.errors import SlimlmError
from tests.conftest import REPO


def cli(*args):
    return subprocess.run([sys.executable, "-m", "slimlm", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_file_decodes_to_the_models_new_weights(tiny_folder, tmp_path, data_dir):
    import slimlm
    from slimlm.formats.gguf import rope_interleave

    model, tok = slimlm.load_model(str(tiny_folder))
    path = slimlm.to_gguf(model, tok, tmp_path / "t.gguf", "Q4_K_M", method="gptq", nsamples=2, seqlen=32,
                          data_dir=data_dir, progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    q = tensors["blk.1.attn_q.weight"]
    assert q.tensor_type.name == "Q5_0"  # 64-wide rows: Q4_K falls back as llama-quantize does
    decoded = gguf.quants.dequantize(q.data, q.tensor_type)
    W = rope_interleave(model.model.layers[1].self_attn.q_proj.weight.detach(), 4).numpy()
    assert np.array_equal(decoded, W)
    record = json.loads(gguf.GGUFReader(path).get_field("slimlm.export").contents())
    assert record["method"] == "gptq" and record["mix"] == "Q4_K_M" and record["calibration"]["nsamples"] == 2


def test_cli_writes_a_size_fitted_file(tiny_folder, tmp_path, data_dir):
    """All-Q8_0 minus 20 kB: the block matrices (78 kB in Q8_0) must give some of it up, and the file meets it."""
    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    assert cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--out", tmp_path / "q8.gguf",
               "--quiet").returncode == 0
    target = tensor_bytes(tmp_path / "q8.gguf") - 20_000
    out = tmp_path / "sized.gguf"
    done = cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--size", target, "--nsamples", "2",
               "--seqlen", "32", "--data-dir", data_dir, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    kinds = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors if "blk" in t.name and len(t.shape) > 1}
    assert tensor_bytes(out) <= target and len(kinds) > 1


@pytest.mark.parametrize("args, message", [
    (["--size", "2bpw", "--method", "rtn"], "smallest types need"),
    (["--size", "lots"], "bits per weight"),
    (["--method", "gptq", "--imatrix"], "--imatrix only applies with --method rtn"),
    (["--type", "Q4_K_X"], "invalid choice"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_folder, tmp_path, data_dir, args, message):
    out = tmp_path / "x.gguf"
    done = cli("gguf", tiny_folder, *args, "--nsamples", "2", "--seqlen", "32", "--data-dir", data_dir, "--out", out)
    assert done.returncode != 0 and message in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_existing_output_and_other_architectures_are_refused(tmp_path):
    from tests.conftest import tiny_opt

    folder = tmp_path / "opt"
    tiny_opt().save_pretrained(folder)
    done = cli("gguf", folder, "--method", "rtn", "--out", tmp_path / "o.gguf")
    assert done.returncode != 0 and "supports llama, qwen2, qwen3" in done.stderr and not (tmp_path / "o.gguf").exists()
    existing = tmp_path / "e.gguf"
    existing.write_bytes(b"mine")
    done = cli("gguf", folder, "--method", "rtn", "--out", existing)
    assert done.returncode != 0 and "already exists" in done.stderr and existing.read_bytes() == b"mine"


def test_gemma3_settings_llama_cpp_computes_otherwise_are_refused():
    """llama.cpp's gemma3 graph fixes the query scale, has no attention soft-capping and no rope scaling on the
    sliding layers: configs that differ are refused, not written into a file that computes something else."""
    from slimlm.formats.gguf_writer import check_architecture

    rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    config = {"model_type": "gemma3_text", "num_attention_heads": 4, "hidden_size": 256, "num_hidden_layers": 2,
              "head_dim": 64, "query_pre_attn_scalar": 64, "rope_parameters": rope}
    assert check_architecture(config) == "gemma3"
    bad = [({"query_pre_attn_scalar": 256}, "1/sqrt\\(64\\)"), ({"attn_logit_softcapping": 50.0}, "soft-capping"),
           ({"rope_parameters": rope | {"sliding_attention": rope["full_attention"]}}, "sliding-window layers"),
           ({"rope_parameters": rope | {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "'yarn'")]
    for change, message in bad:
        with pytest.raises(SlimlmError, match=message):
            check_architecture(config | change)


def test_api_refuses_options_its_method_would_ignore(tmp_path):
    import slimlm
    from tests.conftest import tiny_llama

    with pytest.raises(SlimlmError, match="act_order only applies"):
        slimlm.to_gguf(tiny_llama(), None, tmp_path / "a.gguf", method="rtn", act_order=True)
    with pytest.raises(SlimlmError, match="imatrix only applies"):
        slimlm.to_gguf(tiny_llama(), None, tmp_path / "b.gguf", method="gptq", imatrix=True)
    assert list(tmp_path.iterdir()) == []


def test_size_parsing_and_the_knapsack():
    assert parse_size("3.5bpw").bpw == 3.5 and parse_size("70MB").nbytes == 70_000_000
    assert parse_size("1KiB").nbytes == 1024
    costs = {"a": {"Q4_0": 10.0, "Q8_0": 1.0}, "b": {"Q4_0": 2.0, "Q8_0": 1.5}}
    nbytes = {"a": {"Q4_0": 18, "Q8_0": 34}, "b": {"Q4_0": 18, "Q8_0": 34}}
    assert solve(costs, nbytes, 52) == {"a": "Q8_0", "b": "Q4_0"}  # the upgrade that buys the most loss
    assert solve(costs, nbytes, 68) == {"a": "Q8_0", "b": "Q8_0"}
    with pytest.raises(SlimlmError, match="smallest types need"):
        solve(costs, nbytes, 30)
