"""slimlm gguf / slimlm.to_gguf on a tiny Llama: the file holds what the model now computes, sizes are met, and bad
input gets one line, a non-zero exit and nothing written."""
import json
import subprocess
import sys

import gguf
import numpy as np
import pytest

from slimlm.errors import SlimlmError
from slimlm.gguf.sizing import departures, parse_size, refine, solve
from tests.conftest import REPO


def cli(*args):
    return subprocess.run([sys.executable, "-m", "slimlm", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def test_file_decodes_to_the_models_new_weights(tiny_folder, tmp_path, data_dir):
    import slimlm
    from slimlm.gguf.writer import rope_interleave

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


def test_a_float_file_needs_no_calibration_and_records_no_method(tiny_folder, tmp_path):
    import slimlm

    model, tok = slimlm.load_model(str(tiny_folder))
    path = slimlm.to_gguf(model, tok, tmp_path / "f16.gguf", "F16", data_dir=str(tmp_path / "no-data"),
                          progress=False)  # default method gptq: nothing to round, so the missing data is not read
    record = json.loads(gguf.GGUFReader(path).get_field("slimlm.export").contents())
    assert record["method"] is None and record["calibration"] is None
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1} == {"F16"}


def test_token_embedding_type_sets_that_tensor_alone(tiny_folder, tmp_path):
    import slimlm

    model, tok = slimlm.load_model(str(tiny_folder))
    path = slimlm.to_gguf(model, tok, tmp_path / "e.gguf", "Q4_0", method="rtn", token_embedding_type="f16",
                          progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q4_0"
    record = json.loads(gguf.GGUFReader(path).get_field("slimlm.export").contents())
    assert record["config"]["token-embedding-type"] == "F16"
    with pytest.raises(SlimlmError, match="blocks of 256 do not divide the embedding's 64-wide rows"):
        slimlm.to_gguf(model, tok, tmp_path / "k.gguf", "Q4_0", method="rtn", token_embedding_type="Q6_K",
                       progress=False)
    with pytest.raises(SlimlmError, match="unknown GGUF type 'Q9_0'"):
        slimlm.to_gguf(model, tok, tmp_path / "x.gguf", "Q4_0", method="rtn", token_embedding_type="Q9_0")
    assert not (tmp_path / "k.gguf").exists() and not (tmp_path / "x.gguf").exists()


def test_cli_writes_a_size_fitted_file(tiny_folder, tmp_path, data_dir):
    """All-Q8_0 minus 20 kB: the block matrices (78 kB in Q8_0) must give some of it up, and the file meets it."""
    def tensor_bytes(path):
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)

    done = cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--out", tmp_path / "q8.gguf", "--quiet")
    assert done.returncode == 0
    summary = json.loads(done.stdout)  # what a user reads: the file against its source
    assert summary["bytes"] == (tmp_path / "q8.gguf").stat().st_size and summary["types"]["Q8_0"] > 0
    assert summary["source_bytes"] == (tiny_folder / "model.safetensors").stat().st_size
    assert 8.0 < summary["bits_per_weight"] < 9.0  # Q8_0 is 8.5 bits; float norms add a little
    target = tensor_bytes(tmp_path / "q8.gguf") - 20_000
    out = tmp_path / "sized.gguf"
    done = cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--size", target, "--nsamples", "2",
               "--seqlen", "32", "--data-dir", data_dir, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert tensor_bytes(out) <= target
    check = json.loads(gguf.GGUFReader(out).get_field("slimlm.export").contents())["size"]["check"]
    figures = {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}
    assert figures[check["kept"]] == min(figures.values()) <= check["baseline"]  # never worse than llama.cpp's rule
    assert check["bytes"]["baseline"] <= check["bytes"]["budget"] and check["bytes"]["kept"] <= check["bytes"]["budget"]


def test_a_size_too_small_is_refused_from_the_shapes_naming_one_that_fits(tiny_folder, tmp_path, data_dir):
    """Refused before any calibration (the data folder does not exist), with the smallest size that fits, which
    then works."""
    import re

    import slimlm

    model, tok = slimlm.load_model(str(tiny_folder))
    with pytest.raises(SlimlmError, match="smallest size that fits is --size") as refused:
        slimlm.to_gguf(model, tok, tmp_path / "a.gguf", "Q4_0", method="rtn", size="1.5bpw",
                       data_dir=str(tmp_path / "no-data"), progress=False)
    fits = re.search(r"--size (\S+)$", str(refused.value))[1]
    path = slimlm.to_gguf(model, tok, tmp_path / "b.gguf", "Q4_0", method="rtn", size=fits, nsamples=2,
                          seqlen=32, data_dir=data_dir, progress=False)
    record = json.loads(gguf.GGUFReader(path).get_field("slimlm.export").contents())
    assert record["bits_per_weight"] <= float(fits.removesuffix("bpw")) and not (tmp_path / "a.gguf").exists()


def test_an_existing_file_is_replaced_only_with_overwrite(tiny_folder, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"an older file")
    done = cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--out", out, "--quiet")
    assert done.returncode == 2 and "already exists" in done.stderr and "--overwrite" in done.stderr
    assert out.read_bytes() == b"an older file"
    done = cli("gguf", tiny_folder, "--type", "Q8_0", "--method", "rtn", "--out", out, "--overwrite", "--quiet")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:4] == b"GGUF" and [p.name for p in tmp_path.iterdir()] == ["x.gguf"]


def test_a_run_folder_goes_to_gguf_with_its_zeros(tiny_folder, tmp_path):
    """`slimlm gguf RUN`: a pruned run's folder is a model like any other; Q4_0 stores 0 exactly (d·(8 - 8)),
    so RTN keeps every pruned weight at zero, and the file names the run as its source."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    assert cli("prune", tiny_folder, "--method", "magnitude", "--sparsity", "0.5", "--out", run).returncode == 0
    done = cli("gguf", run, "--type", "Q4_0", "--method", "rtn", "--out", tmp_path / "r.gguf", "--quiet")
    assert done.returncode == 0, done.stderr
    reader = gguf.GGUFReader(tmp_path / "r.gguf")
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    assert up.tensor_type.name == "Q4_0"
    pruned = load_file(run / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].numpy() == 0
    decoded = gguf.quants.dequantize(up.data, up.tensor_type)
    assert pruned.mean() == pytest.approx(0.5, abs=0.01) and np.all(decoded[pruned] == 0)
    assert json.loads(reader.get_field("slimlm.export").contents())["source"] == str(run)


def test_the_file_carries_its_recipe_and_a_replay_writes_the_same_tensors(tiny_folder, tmp_path, data_dir):
    first = tmp_path / "first.gguf"
    done = cli("gguf", tiny_folder, "--type", "Q4_K_M", "--method", "gptq", "--nsamples", "2", "--seqlen", "32",
               "--data-dir", data_dir, "--out", first, "--quiet")
    assert done.returncode == 0, done.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(gguf.GGUFReader(first).get_field("slimlm.recipe").contents())
    first.rename(tmp_path / "kept.gguf")  # the recipe names first.gguf as its out, which must not exist
    assert cli("run", recipe, "--quiet").returncode == 0
    ours, theirs = (gguf.GGUFReader(p).tensors for p in (tmp_path / "kept.gguf", first))
    assert [(t.name, t.tensor_type) for t in ours] == [(t.name, t.tensor_type) for t in theirs]
    assert all(np.array_equal(a.data, b.data) for a, b in zip(ours, theirs))


def test_a_recipe_prunes_then_writes_gguf_and_refuses_what_gguf_cannot_hold(tiny_folder, tmp_path, data_dir):
    """prune -> gguf in one recipe: the run folder has the pruned weights, the file their Q4_0 form (zeros kept);
    a step after gguf, or an online rotation before it, is refused before any work."""
    import yaml

    def recipe(steps, name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"model": str(tiny_folder), "data-dir": data_dir, "out": str(tmp_path / name),
                                        "steps": steps}))
        return cli("run", path, "--quiet")

    gguf_step = {"gguf": {"type": "Q4_0", "method": "rtn", "out": str(tmp_path / "p.gguf")}}
    done = recipe([{"prune": {"method": "magnitude", "sparsity": 0.5}}, gguf_step], "pruned")
    assert done.returncode == 0, done.stderr
    up = next(t for t in gguf.GGUFReader(tmp_path / "p.gguf").tensors if t.name == "blk.1.ffn_up.weight")
    decoded = gguf.quants.dequantize(up.data, up.tensor_type)
    assert (decoded == 0).mean() >= 0.5 and (tmp_path / "pruned" / "recipe.yaml").is_file()
    for steps, message in [([gguf_step, {"eval": {"eval-windows": 1}}], "only export steps may follow"),
                           ([{"rotate": {"seed": 0}}, gguf_step], "online down_proj Hadamard")]:
        (tmp_path / "p.gguf").unlink(missing_ok=True)
        done = recipe(steps, "refused")
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "p.gguf").exists() and not (tmp_path / "refused").exists()


@pytest.mark.parametrize("args, message", [
    (["--size", "2bpw", "--method", "rtn"], "the smallest size that fits is --size "),
    (["--size", "lots"], "bits per weight"),
    (["--method", "gptq", "--imatrix"], "--imatrix only applies with --method rtn"),
    (["--type", "Q4_K_X"], "unknown GGUF mix 'Q4_K_X' (did you mean 'Q4_K_S'?)"),
    (["--method", "gptq"], "its folder"),  # with --out under folders that do not exist: none is made
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_folder, tmp_path, data_dir, args, message):
    out = tmp_path / ("no/such/x.gguf" if args == ["--method", "gptq"] else "x.gguf")
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
    from slimlm.gguf.writer import check_architecture

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

    with pytest.raises(SlimlmError, match="--act-order only applies"):
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


def test_refinement_holds_back_the_kind_the_costs_misprice_and_never_measures_worse():
    """Three kinds, two blocks, rule = B everywhere (12 bytes). The costs call ffn_down free to shrink to A (the
    held-out model's failure); the measured damage (a planted table) says it is the costliest. From the Fisher plan
    the refinement holds ffn_down to the rule, keeps the rest of the plan, and stops when no move helps; from the
    rule nothing helps, so the rule stays."""
    kinds = {"down": "mlp.down_proj", "up": "mlp.up_proj", "q": "self_attn.q_proj"}
    names = {f"model.layers.{i}.{kinds[k]}.weight": k for i in range(2) for k in kinds}
    priced = {"down": {"A": 0.1, "B": 0.09, "C": 0.0}, "up": {"A": 0.1, "B": 0.09, "C": 0.0},
              "q": {"A": 5.0, "B": 1.0, "C": 0.0}}
    damage = {"down": {"A": 10.0, "B": 1.0, "C": 0.9}, "up": {"A": 1.1, "B": 1.0, "C": 0.9},
              "q": {"A": 5.0, "B": 1.0, "C": 0.2}}
    costs = {n: priced[k] for n, k in names.items()}
    nbytes = {n: {"A": 1, "B": 2, "C": 3} for n in names}
    rule = dict.fromkeys(names, "B")

    def measure(plans):
        return {label: sum(damage[names[n]][t] for n, t in plan.items()) for label, plan in plans.items()}
    plan = departures(costs, nbytes, 12, rule)["plan"]
    assert {names[n]: t for n, t in plan.items()} == {"down": "A", "up": "A", "q": "C"}
    refined, moves = refine(costs, nbytes, 12, rule, "plan", measure({"p": plan})["p"], measure)
    assert {names[n]: t for n, t in refined.items()} == {"down": "B", "up": "A", "q": "C"}
    assert moves == [{"move": "hold model.layers.mlp.down_proj", "kld": pytest.approx(4.6)}]
    assert sum(nbytes[n][t] for n, t in refined.items()) <= 12
    assert refine(costs, nbytes, 12, rule, "baseline", 6.0, measure) == (rule, [])
