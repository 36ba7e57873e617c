"""Recipes: every run writes recipe.yaml, `slimlm run` replays it to the same weights bit for bit, bad recipes are
one line naming the key; per-layer overrides; a manifest never contradicts the options (patterns, budget maps).

Reference for the replays: the run of the command line itself; weights must match with torch.equal, as the
recipe and the command share one code path.
"""
import json
from pathlib import Path

import pytest
import yaml

import slimlm
from slimlm.cli import main
from slimlm.core.architectures import linear_fqns
from slimlm.errors import SlimlmError
from slimlm.recipe import dumps, from_data, loads, read_recipe, to_data
from tests.conftest import tiny_llama
from tests.test_offload import assert_same_weights


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def calib_args(calib):
    return ["--calib", calib, "--nsamples", "2", "--seqlen", "32", "--quiet"]


def manifest(folder) -> dict:
    return json.loads((Path(folder) / "slimlm.json").read_text())


def test_round_trip_keeps_every_setting():
    data = {"model": "smollm2-135m", "data-dir": "../shared/data", "out": "runs/x", "steps": [
        {"rotate": {"seed": 3}},
        {"prune": {"method": "sparsegpt", "pattern": "2:4", "calib_sampling": "first", "wbits": 4}},
        {"quantize": {"method": "rtn", "override": {r"layers\.0\.": 8, "down_proj": 3}}},
        {"eval": {"eval-windows": 2}},
        {"export": {"format": "gguf", "out": "runs/x.gguf"}}]}
    recipe = from_data(data)
    text = dumps(recipe)
    again = loads(text)
    assert to_data(again) == to_data(recipe)
    written = yaml.safe_load(text)
    prune = written["steps"][1]["prune"]
    # every setting in effect is listed, defaults too, under the flag's name; one that changes nothing is not
    assert prune["calib-sampling"] == "first" and prune["pattern"] == "2:4" and prune["blocksize"] == 128
    assert prune["sparsity"] is None and prune["override"] == {} and "ria-alpha" not in prune
    assert written["steps"][2]["quantize"]["override"] == {r"layers\.0\.": 8, "down_proj": 3}
    assert written["dtype"] == "float32" and written["steps"][3]["eval"]["eval-seqlen"] == 2048


def test_a_depth_shrink_recipe_lists_no_width_settings():
    recipe = loads("model: m\nsteps:\n- shrink: {drop-layers: 2}\n")
    (step,) = yaml.safe_load(dumps(recipe))["steps"]
    assert step["shrink"]["drop-layers"] == 2 and step["shrink"]["score"] == "influence"
    assert not {"method", "allocation", "no-compensate"} & set(step["shrink"])
    assert loads(dumps(recipe)) == recipe


def test_unquoted_nm_pattern_stays_a_pattern():
    # YAML 1.1 would read 2:4 as the base-60 integer 124
    recipe = loads("model: m\nsteps:\n- prune: {pattern: 2:4}\n")
    assert recipe.steps[0][1].pattern == "2:4"


@pytest.mark.parametrize("text,message", [
    ("model: m\nsteps:\n- prune: {methd: wanda}", "steps[0].prune.methd: unknown key 'methd' (did you mean 'method'?)"),
    ("modle: m\nsteps: []", "modle: unknown key 'modle' (did you mean 'model'?)"),
    ("model: m\nsteps:\n- prnue: {}", "steps[0]: unknown step kind 'prnue' (did you mean 'prune'?)"),
    ("model: m\nsteps:\n- quantize: {method: gptqq}", "steps[0].quantize.method: unknown quantization method 'gptqq' (did you mean "
                                                      "'gptq'?)"),
    ("model: m\nsteps:\n- prune: {calib_sampling: firts}", "steps[0].prune.calib_sampling: unknown value 'firts' "
                                                           "(did you mean 'first'?)"),
    ("model: m\nsteps:\n- prune: {sparsity: half}", "steps[0].prune.sparsity: invalid float value: 'half'"),
    ("model: m\nsteps:\n- prune: {permute: 1}", "steps[0].prune.permute: expected true or false, got 1"),
    ("model: m\nsteps:\n- export: {format: gguf}", "steps[0].export.out: a value is required"),
    ("model: m\nsteps:\n- prune: {override: {'(': 0.5}}", "steps[0].prune.override: bad regular expression '('"),
    ("model: m\nsteps: {prune: {}}", "steps: expected a list of steps"),
    ("model: [m\n", "cannot read"),
])
def test_bad_recipe_text_names_the_key_and_the_closest_valid_one(text, message):
    with pytest.raises(SlimlmError) as e:
        loads(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("steps,message", [
    ("- prune: {method: wandaa}", "steps[0].prune.method: unknown pruning method 'wandaa' (did you mean "
                                  "'wanda'?)"),
    ("- prune: {pattern: '2:4', sparsity: 0.7}", "steps[0].prune: pattern 2:4 fixes every layer's sparsity at 0.5"),
    ("- prune: {}\n- export: {format: sparse, out: x}\n- eval: {}", "steps[2].eval: comes after an export step"),
    ("- eval: {}\n- prune: {}", "steps[0].eval: evaluates the model of the run"),
    ("- prune: {}\n- rotate: {}", "steps[1].rotate: rotate once, before any prune or quantize step"),
    ("- rotate: {}\n- quantize: {rotate: hadamard}", "steps[1].quantize: rotate is 'hadamard'"),
    ("- quantize: {allocation: owl}", "steps[0].quantize: allocation 'owl' spreads an average bit-width"),
    ("- prune: {}\n- analyze: {}", "steps[1].analyze: needs an out of its own"),
    ("- prune: {method: wanda, ria-alpha: 0.3}", "steps[0].prune: ria-alpha only applies with method ria"),
])
def test_contradicting_recipe_is_refused_before_loading(capsys, tmp_path, steps, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"model: {tmp_path / 'no-such-model'}\nout: {tmp_path / 'run'}\nsteps:\n{steps}\n")
    code, _, err = cli(capsys, "run", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


@pytest.mark.parametrize("command", [
    ["prune", "--method", "ria", "--pattern", "2:4", "--permute"],  # + the N:M permutations file
    ["quantize", "--method", "gptq", "--wbits", "3", "--group-size", "32", "--act-order", "--override", "down=8"],
])
def test_replay_gives_bit_identical_weights(capsys, tmp_path, tiny_folder, calib, command):
    first, replay = tmp_path / "first", tmp_path / "replay"
    assert cli(capsys, command[0], tiny_folder, *command[1:], *calib_args(calib), "--out", first)[0] == 0
    code, out, err = cli(capsys, "run", first / "recipe.yaml", "--out", replay, "--quiet")
    assert code == 0, err
    assert json.loads(out)["out"] == str(replay)
    assert_same_weights(first, replay)
    assert manifest(first)["layers"] == manifest(replay)["layers"]
    recipe = read_recipe(replay / "recipe.yaml")
    assert recipe.run.out == str(replay) and to_data(recipe)["steps"] == to_data(read_recipe(first / "recipe.yaml"))[
        "steps"]
    code, _, err = cli(capsys, "run", first / "recipe.yaml", "--quiet")  # its own folder exists
    assert code == 2 and "already exists" in err


def test_rotate_step_then_quantize_equals_quantize_rotate_hadamard(capsys, tmp_path, tiny_folder, calib):
    args = ["--method", "gptq", "--wbits", "4", "--group-size", "32", *calib_args(calib)]
    assert cli(capsys, "quantize", tiny_folder, *args, "--rotate", "hadamard", "--out", tmp_path / "one")[0] == 0
    recipe = yaml.safe_load((tmp_path / "one" / "recipe.yaml").read_text())
    quantize = recipe["steps"][0]["quantize"]
    recipe["steps"] = [{"rotate": {"seed": quantize["seed"]}}, {"quantize": {**quantize, "rotate": "none"}}]
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = cli(capsys, "run", tmp_path / "two.yaml", "--out", tmp_path / "two", "--quiet")
    assert code == 0, err
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    two = manifest(tmp_path / "two")
    assert two["rotation"] == manifest(tmp_path / "one")["rotation"]  # apply_runtime re-attaches the same hook
    assert [s["kind"] for s in two["steps"]] == ["rotate", "quantize"]
    assert two["timings"]["total"] == sum(s["timings"]["total"] for s in two["steps"])


def test_multi_step_recipe_exports_gguf_carrying_the_recipe(capsys, tmp_path, tiny_folder, calib):
    import gguf

    run = tmp_path / "run"
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": str(tiny_folder), "out": str(run), "steps": [
        {"rotate": {"no-online-down": True}},
        {"quantize": {"method": "rtn", "group-size": 32, "scale-dtype": "float16"}},
        {"eval": {"eval-dataset": calib, "eval-seqlen": 32, "eval-windows": 2}},
        {"export": {"format": "gguf", "out": f"{run}.gguf"}},
        {"export": {"format": "compressed-tensors", "out": f"{run}-ct"}}]}))
    code, out, err = cli(capsys, "run", tmp_path / "r.yaml", "--quiet")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["out"] for line in lines] == [str(run), f"{run}.gguf", f"{run}-ct"]
    assert lines[1]["max_abs_deviation"] == 0
    text = (run / "recipe.yaml").read_text()
    assert gguf.GGUFReader(f"{run}.gguf").fields["slimlm.recipe"].contents() == text
    assert (tmp_path / "run-ct" / "recipe.yaml").read_text() == text
    m = manifest(run)
    assert m["kind"] == "quantize" and m["rotation"]["online_down"] is None
    assert m["metrics"]["perplexity"]["windows"] == 2
    # replayed elsewhere, the exports named after the run folder move along with it
    code, out, err = cli(capsys, "run", run / "recipe.yaml", "--out", tmp_path / "again", "--quiet")
    assert code == 0, err
    assert [json.loads(line)["out"] for line in out.splitlines()] == [
        str(tmp_path / "again"), f"{tmp_path / 'again'}.gguf", f"{tmp_path / 'again'}-ct"]
    assert Path(f"{tmp_path / 'again'}.gguf").read_bytes() != Path(f"{run}.gguf").read_bytes()  # its own recipe
    assert_same_weights(run, tmp_path / "again")


def test_export_command_adds_its_step_to_the_runs_recipe(capsys, tmp_path, tiny_folder, calib):
    run, sparse = tmp_path / "run", tmp_path / "run-sparse"
    assert cli(capsys, "prune", tiny_folder, "--method", "magnitude", "--out", run, *calib_args(calib))[0] == 0
    assert cli(capsys, "export", run, "--format", "sparse", "--out", sparse)[0] == 0
    recipe = read_recipe(sparse / "recipe.yaml")
    assert [kind for kind, _ in recipe.steps] == ["prune", "export"]
    assert recipe.steps[1][1].format == "sparse" and recipe.steps[1][1].out == str(sparse)
    code, _, err = cli(capsys, "run", sparse / "recipe.yaml", "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    assert (tmp_path / "b-sparse" / "sparse_config.json").is_file()
    assert_same_weights(run, tmp_path / "b")


def test_overrides_first_matching_regex_wins():
    from slimlm.report.tables import Run, row

    model = tiny_llama()
    layers = linear_fqns(model)
    result = slimlm.prune(model, method="magnitude", sparsity=0.5, progress=False,
                          overrides={r"layers\.0\.mlp": 0.1, "mlp": 0.8, r"q_proj": 0.0})
    expected = {f: 0.1 if "layers.0.mlp" in f else 0.8 if "mlp" in f else 0.0 if "q_proj" in f else 0.5
                for f in layers}
    achieved = result.manifest["layers"]
    assert {f: achieved[f]["target"] for f in layers} == expected
    assert all(abs(achieved[f]["sparsity"] - expected[f]) < 0.02 for f in layers)
    sizes = {f: lin.weight.numel() for f, lin in layers.items()}
    mean = sum(expected[f] * sizes[f] for f in layers) / sum(sizes.values())
    assert result.manifest["sparsity_target"] == pytest.approx(mean, abs=1e-12)
    assert result.manifest["allocation"]["overrides"] == {r"layers\.0\.mlp": 0.1, "mlp": 0.8, r"q_proj": 0.0}
    assert row(Run("r", Path("r"), result.manifest, None))["budget"] == f"{mean:g} override"
    with pytest.raises(SlimlmError, match="override 'up_prj' matches no layer"):
        slimlm.prune(tiny_llama(), method="magnitude", overrides={"up_proj": 0.2, "up_prj": 0.3}, progress=False)
    result = slimlm.quantize(tiny_llama(), method="rtn", wbits=4, overrides={"down_proj": 8}, progress=False)
    bits = {f: r["bits"] for f, r in result.manifest["layers"].items()}
    assert bits == {f: 8 if "down_proj" in f else 4 for f in layers}


@pytest.mark.parametrize("extra,given", [(["--sparsity", "0.7"], "sparsity"), (["--allocation", "owl"], "allocation"),
                                        (["--override", "down=0.6"], "override")])
def test_pattern_with_a_sparsity_option_is_an_error(capsys, tmp_path, tiny_folder, calib, extra, given):
    code, _, err = cli(capsys, "prune", tiny_folder, "--pattern", "2:4", *extra, "--out", tmp_path / "r",
                       *calib_args(calib))
    assert code == 2 and f"pattern 2:4 fixes every layer's sparsity at 0.5; drop {given}" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())
    with pytest.raises(SlimlmError, match="drop sparsity"):
        slimlm.prune(tiny_llama(), method="magnitude", pattern="2:4", sparsity=0.7, progress=False)
    result = slimlm.prune(tiny_llama(), method="magnitude", pattern="1:4", progress=False)
    assert result.manifest["sparsity_target"] == 0.75 and result.manifest["sparsity"] == 0.75


def test_budgets_map_run_says_what_was_done(capsys, tmp_path, tiny_folder, calib, data_dir, monkeypatch):
    from slimlm.report.tables import Run, row

    model = tiny_llama()
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(model).items()}
    budgets = {f: 0.8 if "mlp" in f else 0.4 for f in sizes}
    (tmp_path / "budgets.json").write_text(json.dumps(budgets))
    mean = sum(budgets[f] * sizes[f] for f in sizes) / sum(sizes.values())
    monkeypatch.setenv("SLIMLM_DATA_DIR", str(Path(data_dir).resolve()))
    monkeypatch.chdir(tmp_path)  # the default folder is runs/<model>-<method>-<budget> under the current one
    code, out, err = cli(capsys, "prune", tiny_folder, "--method", "wanda", "--budgets", "budgets.json",
                         *calib_args(calib))
    assert code == 0, err
    folder = Path(json.loads(out)["out"])
    assert folder == Path("runs") / f"{tiny_folder.name}-wanda-budgets-{round(mean, 4):g}"
    m = manifest(folder)
    assert m["sparsity_target"] == pytest.approx(mean, abs=1e-12) and m["sparsity"] == pytest.approx(mean, abs=0.01)
    assert m["allocation"]["name"] == "budgets" and m["allocation"]["file"] == "budgets.json"
    assert {f: r["target"] for f, r in m["layers"].items()} == budgets
    assert row(Run(folder.name, folder, m, None))["budget"] == f"{mean:g} budgets"
    for extra, message in ((["--sparsity", "0.3"], "the budgets map sets every layer, so sparsity would be ignored"),
                           (["--allocation", "owl"], "a budgets map replaces the allocator")):
        code, _, err = cli(capsys, "prune", tiny_folder, "--budgets", "budgets.json", *extra, "--out", "other",
                           *calib_args(calib))
        assert code == 2 and message in err and not Path("other").exists()


def test_every_recipe_of_the_readme_tables_reads():
    from tests.conftest import REPO

    paths = sorted((REPO / "recipes").glob("*/*.yaml"))
    assert len(paths) > 50
    for path in paths:
        recipe = read_recipe(path)
        assert recipe.run.model == "smollm2-135m" and recipe.run.data_dir == "../shared/data", path
        if path.parent.name != "examples":  # a table row: its evaluation protocol is part of it
            assert [kind for kind, _ in recipe.steps][-1] == "eval", path
