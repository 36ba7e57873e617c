"""slimlm sweep on a local Ray (slimlm.sweep): every cell a run folder that `slimlm run` of its recipe reproduces,
finished cells skipped on rerun, one JSON and plot; bad input refused before Ray starts or in seconds."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import slimlm
from slimlm.cli import main
from slimlm.pipeline import Context, run_steps
from slimlm.recipe import RunOptions, read_recipe
from tests.conftest import REPO



@pytest.fixture
def ray():
    """Tests that start or reach Ray need it installed (pip install 'slimlm[ray]'); the refusals before Ray starts
    run without it."""
    return pytest.importorskip("ray")


def sweep_args(model, out, calib, *extra):
    return ["sweep", str(model), "--methods", "magnitude,wanda", "--sparsities", "0.5,0.7", "--calib", calib,
            "--nsamples", "2", "--seqlen", "32", "--eval-dataset", calib, "--eval-seqlen", "32", "--eval-windows",
            "2", "--out", str(out), "--quiet", *extra]


def slimlm_cli(*argv) -> subprocess.CompletedProcess:
    """The CLI in its own process, so the local Ray it starts ends with it."""
    return subprocess.run([sys.executable, "-m", "slimlm", *argv], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_four_cell_sweep_on_local_ray(ray, tmp_path, tiny_folder, calib):
    out = tmp_path / "sweep"
    done = slimlm_cli(*sweep_args(tiny_folder, out, calib))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    names = {"magnitude-0.5-uniform-seed0", "magnitude-0.7-uniform-seed0", "wanda-0.5-uniform-seed0",
             "wanda-0.7-uniform-seed0"}
    assert {r["cell"] for r in rows} == names and (out / "sweep.png").stat().st_size > 0
    assert {p.name for p in out.iterdir()} == names | {"sweep.json", "sweep.png"}
    for row in rows:  # each row is its cell's manifest
        manifest = json.loads((out / row["cell"] / "slimlm.json").read_text())
        assert row["perplexity"] == manifest["metrics"]["perplexity"]["perplexity"]
        assert (row["method"], row["target"]) == (manifest["method"], manifest["sparsity_target"])
        assert abs(manifest["sparsity"] - row["target"]) < 0.02  # whole weights per 64-wide row

    # a cell's recipe replayed in this process gives the same perplexity as the Ray worker measured
    cell = out / "wanda-0.7-uniform-seed0"
    model, tokenizer = slimlm.load_model(str(tiny_folder))
    recipe = read_recipe(cell / "recipe.yaml")
    manifests, _, _ = run_steps(recipe, Context(model, tokenizer, recipe.run, RunOptions(quiet=True)))
    wanda = next(r for r in rows if r["cell"] == cell.name)
    assert manifests[-1]["metrics"]["perplexity"]["perplexity"] == wanda["perplexity"]

    # rerun: nothing left to do, so no Ray; a deleted cell alone is run again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    start = time.perf_counter()
    assert slimlm_cli(*sweep_args(tiny_folder, out, calib)).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_dir()} == stamps
    shutil.rmtree(out / "magnitude-0.5-uniform-seed0")
    done = slimlm_cli(*sweep_args(tiny_folder, out, calib))
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_dir() and p.name in stamps} \
        .items() >= {k: v for k, v in stamps.items() if k != "magnitude-0.5-uniform-seed0"}.items()
    assert len(json.loads((out / "sweep.json").read_text())["rows"]) == 4
    assert time.perf_counter() - start < 900


def test_unreachable_ray_address_fails_fast(ray, capsys, tmp_path, tiny_folder, calib):
    start = time.perf_counter()
    code = main(sweep_args(tiny_folder, tmp_path / "sweep", calib, "--ray", "127.0.0.1:9"))
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach the Ray cluster at 127.0.0.1:9" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - start < 30 and not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("change,message", [
    (["--methods", "wanda,pruneall"], "pruneall"),
    (["--sparsities", "0.5,high"], "--sparsities: expected comma-separated float values"),
    (["--sparsities", "1.5"], "1.5"),
])
def test_bad_cells_are_refused_before_ray_starts(capsys, tmp_path, tiny_folder, calib, change, message):
    code = main(sweep_args(tiny_folder, tmp_path / "sweep", calib, *change))
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_a_folder_of_other_settings_is_not_taken_as_finished(capsys, tmp_path, tiny_folder, calib):
    out = tmp_path / "sweep"
    (out / "wanda-0.5-uniform-seed0").mkdir(parents=True)
    (out / "wanda-0.5-uniform-seed0" / "slimlm.json").write_text("{}")
    (out / "wanda-0.5-uniform-seed0" / "recipe.yaml").write_text("model: other\n")
    code = main(sweep_args(tiny_folder, out, calib))
    err = capsys.readouterr().err
    assert code == 2 and "holds a run with other settings" in err and len(err.strip().splitlines()) == 1


def test_without_ray_the_sweep_says_how_to_install_it(capsys, tmp_path, tiny_folder, calib, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` raises ImportError
    code = main(sweep_args(tiny_folder, tmp_path / "sweep", calib))
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'slimlm[ray]'" in err and len(err.strip().splitlines()) == 1
