"""slimlm lowrank: parameter targets per allocation, saved factors reload, merging, the CLI and slimlm speed."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import slimlm
from slimlm.errors import SlimlmError
from slimlm.config import LowrankConfig
from slimlm.config.schema import field_choices
from slimlm.structured.factorize import lowrank
from slimlm.core.architectures import linear_fqns
from slimlm.structured.lowrank import LowRankLinear, lowrank_params
from slimlm.structured.shrink import parameter_counts
from slimlm.structured import factorize
from tests.conftest import REPO, held_out_kld, tiny_llama, trapped_llama


def windows(n=8, length=32, vocab=128):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("allocation", [a for a in field_choices(LowrankConfig, "allocation") if a != "auto"])
def test_allocations_keep_at_most_the_target_and_only_factor_where_it_saves(allocation):
    model = tiny_llama()
    before = parameter_counts(model)["decoder_linears"]
    result = lowrank(model, params=0.8, method="svdllm", allocation=allocation, calib=windows(), progress=False)
    kept = parameter_counts(model)["decoder_linears"] / before
    assert kept == pytest.approx(result.manifest["params_kept"])
    assert 0.7 < kept <= 0.8 + 1e-9, (allocation, kept)
    for fqn, rank in result.manifest["ranks"].items():
        module = model.get_submodule(fqn)
        assert isinstance(module, LowRankLinear) == (rank is not None)
        if rank is not None:
            assert rank * (module.in_features + module.out_features) < module.in_features * module.out_features


def test_a_planted_trap_in_the_rank_costs_is_caught_and_the_figures_equal_a_re_measurement(monkeypatch):
    real = factorize._fisher_losses

    def planted(*args, **kwargs):  # block 0 called nearly free to truncate, where truncating it costs the most
        return {f: loss * (1e-6 if ".layers.0." in f else 1.0) for f, loss in real(*args, **kwargs).items()}
    monkeypatch.setattr(factorize, "_fisher_losses", planted)
    source, calib = trapped_llama(), windows(8, 64)
    model = copy.deepcopy(source)
    manifest = lowrank(model, params=0.6, allocation="fisher", merge=True, calib=calib, progress=False).manifest
    check = manifest["allocation_check"]
    assert check["plan"] > check["baseline"]  # the trap works: the planted plan measures worse than uniform ranks
    figures = {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}
    assert check["kept"] != "plan" and figures[check["kept"]] == min(figures.values()) <= check["baseline"]
    shapes = {f: tuple(lin.weight.shape) for f, lin in linear_fqns(source).items()}
    assert lowrank_params(manifest["ranks"], shapes) <= 0.6 * sum(o * i for o, i in shapes.values())
    assert manifest["calibration"]["held_out"] == 4
    held = calib[-4:]
    assert held_out_kld(source, model, held) == pytest.approx(figures[check["kept"]], rel=1e-4)
    uniform = copy.deepcopy(source)
    lowrank(uniform, params=0.6, allocation="uniform", merge=True, calib=calib[:-4], progress=False)
    assert held_out_kld(source, uniform, held) == pytest.approx(check["baseline"], rel=1e-4)


def test_the_published_rules_keep_their_ranks_and_report_the_check():
    done = lowrank(tiny_llama(), params=0.6, method="welore", calib=windows(8, 64), progress=False).manifest
    ruled = lowrank(tiny_llama(), params=0.6, method="welore", holdout=0, progress=False).manifest
    assert done["allocation_check"]["kept"] == "plan" and done["allocation_check"]["path"] == {}
    assert done["ranks"] == ruled["ranks"] and ruled["allocation_check"] is None  # WeLore's own rule, data-free


def test_saved_factors_reload_with_the_same_logits_and_merge_loads_in_plain_transformers(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    for merge in (False, True):
        model, tok = slimlm.load_model(str(tiny_folder))
        ids = windows(4, 32, 49152)
        result = lowrank(model, tok, params=0.7, method="svdllm", merge=merge, calib=ids, progress=False)
        out = tmp_path / f"run-{merge}"
        slimlm.save(model, tok, out, result)
        manifest = json.loads((out / "slimlm.json").read_text())
        assert ("structure" in manifest) == (not merge)
        reloaded, _ = slimlm.load_model(str(out))
        assert torch.equal(logits(reloaded, ids), logits(model, ids))
        if merge:
            plain = AutoModelForCausalLM.from_pretrained(out).eval()
            assert torch.equal(logits(plain, ids), logits(model, ids))


def test_bad_inputs_are_refused():
    with pytest.raises(SlimlmError, match="in \\(0, 1\\)"):
        lowrank(tiny_llama(), params=1.0, calib=windows(), progress=False)
    with pytest.raises(SlimlmError, match="--method: unknown value 'tucker'"):
        lowrank(tiny_llama(), params=0.5, method="tucker", calib=windows(), progress=False)


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "slimlm", *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO)


def test_cli_lowrank_then_speed_beside_the_source_model(tiny_folder, tmp_path, data_dir):
    out = tmp_path / "r"
    done = run_cli("lowrank", tiny_folder, "--params", "0.7", "--nsamples", "4", "--seqlen", "32", "--data-dir",
                   data_dir, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["params_kept"] <= 0.7
    assert "lowrank:" in (out / "recipe.yaml").read_text()
    done = run_cli("speed", out, "--prompt-tokens", "8", "--new-tokens", "2", "--batches", "1", "--repeats", "1",
                   "--threads", "1", "--json", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["baseline"] == str(tiny_folder)
    assert result["models"][1]["params"] < result["models"][0]["params"]
    # WeLore's rule is data-free: without its allocation check (--holdout 0) calibration options are refused
    done = run_cli("lowrank", tiny_folder, "--params", "0.7", "--method", "welore", "--holdout", "0", "--nsamples",
                   "4")
    assert done.returncode == 2 and "--nsamples only applies with" in done.stderr
    done = run_cli("lowrank", tiny_folder, "--params", "0.7", "--allocation", "uniform", "--holdout", "2")
    assert done.returncode == 2 and "--holdout only applies with a non-uniform allocation" in done.stderr
    done = run_cli("speed", tiny_folder, "--quiet")
    assert done.returncode == 2 and "--baseline is needed" in done.stderr
