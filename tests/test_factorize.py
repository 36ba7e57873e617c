"""slimlm lowrank: parameter targets per allocation, saved factors reload, merging, the CLI and slimlm speed."""
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
from slimlm.structured.lowrank import LowRankLinear
from slimlm.structured.shrink import parameter_counts
from tests.conftest import REPO, tiny_llama


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
    done = run_cli("lowrank", tiny_folder, "--params", "0.7", "--method", "welore", "--nsamples", "4")
    assert done.returncode == 2 and "--nsamples only applies with" in done.stderr
    done = run_cli("speed", tiny_folder, "--quiet")
    assert done.returncode == 2 and "--baseline is needed" in done.stderr
