"""Command line on tiny models: bad input gives one line, a non-zero exit, and writes nothing."""
import json

import pytest
import torch

from slimlm.cli import main
from slimlm.cli.commands import readable


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--method", "obs"], "unknown pruning method"),
    (["--calib", "/no/such/file.txt"], "unknown data source"),
    (["--nsamples", "100000", "--calib-sampling", "first"], "calibration text has"),
])
def test_bad_prune_input(capsys, tmp_path, tiny_folder, data_dir, argv, message):
    out = tmp_path / "run"
    code, _, err = run(capsys, "prune", str(tiny_folder), "--out", str(out), "--data-dir", data_dir,
                       "--nsamples", "2", "--seqlen", "32", "--quiet", *argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_unreadable_model_and_unknown_architecture(capsys, tmp_path):
    code, _, err = run(capsys, "prune", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o"))
    assert code == 2 and "model file not found" in err
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run(capsys, "eval", str(bad))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_prune_save_eval_and_overwrite(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "run"
    args = ["prune", str(tiny_folder), "--method", "sparsegpt", "--pattern", "2:4", "--out", str(out),
            "--data-dir", data_dir, "--nsamples", "4", "--seqlen", "32", "--quiet"]
    code, stdout, _ = run(capsys, *args)
    assert code == 0, stdout
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["method"] == "sparsegpt" and manifest["pattern"] == "2:4"
    assert manifest["calibration"]["nsamples"] == 4 and manifest["seed"] == 0
    assert all(abs(v["sparsity"] - 0.5) < 1e-6 for v in manifest["layers"].values())
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(capsys, *args[:-1], "--sparsity", "0.3", "--pattern", "unstructured")
    assert code == 2 and "already exists" in err
    assert (out / "model.safetensors").read_bytes() == before
    code, stdout, _ = run(capsys, "eval", str(out), "--data-dir", data_dir, "--eval-seqlen", "64",
                          "--eval-windows", "2", "--record", "--quiet")
    assert code == 0
    ppl = json.loads(stdout)["perplexity"]  # printed to four significant digits, recorded in full
    recorded = json.loads((out / "slimlm.json").read_text())["metrics"]["perplexity"]["perplexity"]
    assert ppl == readable(recorded) and ppl == pytest.approx(recorded, rel=1e-3)


def test_analyze_then_allocate_then_prune_with_budgets(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "analysis"
    code, stdout, err = run(capsys, "analyze", str(tiny_folder), "--out", str(out), "--data-dir", data_dir,
                            "--nsamples", "4", "--seqlen", "32", "--target", "sparsity=0.6", "--quiet")
    assert code == 0, err
    for name in ("metrics.json", "metrics.csv", "alpha_depth.png", "esd.png", "budgets.png", "slimlm.json",
                 "recipe.yaml"):
        assert (out / name).is_file(), name
    records = json.loads((out / "metrics.json").read_text())
    assert {"name", "block", "kind", "shape", "alpha", "alpha_hat", "xmin", "stable_rank", "spectral_norm",
            "owl_lod", "errors", "fisher"} <= set(records[0])
    sizes = {r["name"]: r["size"] for r in records}
    for allocation in ("owl", "alphapruning", "errortable", "fisher"):  # the last one is pruned with below
        code, stdout, err = run(capsys, "allocate", str(out), "--target", "sparsity=0.6",
                                "--allocation", allocation, "--out", str(tmp_path / f"{allocation}.json"))
        assert code == 0, err
        budgets = json.loads((tmp_path / f"{allocation}.json").read_text())
        mean = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
        assert abs(mean - 0.6) <= 0.6e-3 and all(0 <= b <= 0.99 for b in budgets.values())
    code, stdout, err = run(capsys, "prune", str(tiny_folder), "--method", "wanda", "--budgets",
                            str(tmp_path / "fisher.json"), "--out", str(tmp_path / "run"),
                            "--data-dir", data_dir, "--nsamples", "4", "--seqlen", "32", "--quiet")
    assert code == 0, err
    layers = json.loads((tmp_path / "run" / "slimlm.json").read_text())["layers"]
    assert {n: v["target"] for n, v in layers.items()} == budgets
    code, _, err = run(capsys, "allocate", str(out), "--target", "sparsity=1.5")
    assert code == 2 and "outside" in err


@pytest.mark.parametrize("argv,message", [
    (["--wbits", "9"], "bits must be an integer in 2..8"),
    (["--wbits", "4", "--abits", "1"], "bits must be an integer in 2..8"),
    (["--group-size", "-5"], "group_size must be a positive integer"),
    (["--allocation", "magic", "--avg-bits", "3.5"], "unknown allocation"),
    (["--kvbits", "9"], "KV-cache quantization: bits must be an integer in 2..8"),
    (["--abits", "4", "--act-clip", "1.5"], "clip_ratio must be in (0, 1]"),
    (["--method", "rtn", "--transform", "duquant", "--alpha", "2"], "alpha must be in [0, 1]"),
])
def test_bad_quantize_input(capsys, tmp_path, tiny_folder, data_dir, argv, message):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", str(tiny_folder), "--out", str(out), "--data-dir", data_dir, "--quiet",
                       *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_quantize_cli_writes_storage_and_evals(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", str(tiny_folder), "--method", "gptq", "--wbits", "4",
                            "--group-size", "32", "--asym", "--act-order", "--out", str(out), "--data-dir",
                            data_dir, "--nsamples", "4", "--seqlen", "32", "--eval", "--eval-seqlen", "64",
                            "--eval-windows", "1", "--quiet")
    assert code == 0, err
    manifest = json.loads((out / "slimlm.json").read_text())
    assert manifest["method"] == "gptq" and manifest["act_order"] and not manifest["symmetric"]
    assert manifest["storage"]["quantized_linear_bytes_per_param"] < 1.0  # 4-bit codes + g32 scales/zeros
    assert manifest["metrics"]["perplexity"]["perplexity"] > 1


def test_outlier_quantized_run_evaluates_to_the_same_perplexity(capsys, tmp_path, tiny_folder, data_dir):
    out = tmp_path / "duq"
    code, stdout, err = run(capsys, "quantize", str(tiny_folder), "--method", "rtn", "--wbits", "4", "--abits", "4",
                            "--kvbits", "4", "--transform", "duquant", "--intact-kv", "bos", "--group-size", "-1",
                            "--out", str(out), "--data-dir", data_dir, "--nsamples", "2", "--seqlen", "32",
                            "--eval", "--eval-seqlen", "64", "--eval-windows", "2", "--quiet")
    assert code == 0, err
    measured = json.loads(stdout.strip().splitlines()[-1])["perplexity"]
    assert (out / "runtime.safetensors").is_file()
    code, stdout, err = run(capsys, "eval", str(out), "--data-dir", data_dir, "--eval-seqlen", "64",
                            "--eval-windows", "2", "--quiet")
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] == measured


def test_export_cli_round_trip(capsys, tmp_path, tiny_folder, data_dir):
    from slimlm.formats.sparse import load_sparse

    run_dir = tmp_path / "run"
    code, _, err = run(capsys, "prune", str(tiny_folder), "--method", "wanda", "--pattern", "2:4", "--out",
                       str(run_dir), "--data-dir", data_dir, "--nsamples", "2", "--seqlen", "32", "--quiet")
    assert code == 0, err
    code, stdout, err = run(capsys, "export", str(run_dir), "--format", "sparse", "--out", str(tmp_path / "sp"))
    assert code == 0, err
    from safetensors.torch import load_file
    dense = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(dense[k], v) for k, v in load_sparse(tmp_path / "sp").items())
    code, _, err = run(capsys, "export", str(run_dir), "--format", "compressed-tensors", "--out",
                       str(tmp_path / "ct"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "ct").exists()


@pytest.mark.parametrize("argv", [["speed", "runs/does-not-exist"], ["speed", "runs/does-not-exist", "--baseline",
                                                                     "smollm2-135m"], ["eval", "runs/typo"]])
def test_a_missing_run_folder_is_named_as_such(capsys, tmp_path, monkeypatch, argv):
    """Not "--baseline is needed", not the Hugging Face hub: runs/ exists, so runs/X is a path that does not."""
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err == f"slimlm: error: no such model folder: {argv[1]} (runs has no {argv[1][5:]})\n"


def test_eval_after_compression_prints_the_source_on_the_same_windows(capsys, tmp_path, tiny_folder, data_dir):
    """What a compression cost: --eval measures the source too, before the step, on the same windows."""
    window = ["--data-dir", data_dir, "--eval-seqlen", "64", "--eval-windows", "1", "--quiet"]
    code, stdout, err = run(capsys, "prune", str(tiny_folder), "--method", "magnitude", "--sparsity", "0.9",
                            "--out", str(tmp_path / "p"), "--eval", *window)
    assert code == 0, err
    printed = json.loads(stdout.strip().splitlines()[-1])
    code, stdout, err = run(capsys, "eval", str(tiny_folder), *window)
    assert code == 0, err
    assert printed["source_perplexity"] == json.loads(stdout)["perplexity"] != printed["perplexity"]
    recorded = json.loads((tmp_path / "p" / "slimlm.json").read_text())["metrics"]["perplexity"]
    assert readable(recorded["source_perplexity"]) == printed["source_perplexity"]
