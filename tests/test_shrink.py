"""Structured compression: depth scores and removal, width units, FLAP's compensation, allocations, reloads."""
import copy
import json
import subprocess
import sys

import pytest
import torch

import slimlm
from slimlm.core.architectures import decoder_blocks
from slimlm.errors import SlimlmError
from slimlm.structured import depth, width, widths
from slimlm.structured.shrink import parameter_counts, shrink
from tests.conftest import REPO, held_out_kld, tiny_llama, tiny_opt, trapped_llama


def windows(n=6, length=24, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_influence_is_one_minus_the_cosine_of_each_blocks_input_and_output():
    model, ids = tiny_llama(layers=3), windows()
    states = depth.block_inputs(model, ids, "cpu", 2, progress=False)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, then each block's output
    for i, score in enumerate(depth.influence_scores(states)):
        x, y = hidden[i], hidden[i + 1] if i + 1 < 3 else states[3]  # HF's last entry is after the final norm
        expected = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
        assert abs(score - expected.item()) < 1e-5


def test_skip_loss_is_the_loss_of_the_model_without_that_block_minus_the_dense_loss():
    model, ids = tiny_llama(layers=3), windows()
    dense = model(input_ids=ids, labels=ids).loss.item()
    states = depth.block_inputs(model, ids, "cpu", 3, progress=False)
    scores = depth.skip_losses(model, ids, states, 3, progress=False)
    for i in range(3):
        smaller = copy.deepcopy(model)
        depth.drop_blocks_(smaller, [i])
        assert abs(scores[i] - (smaller(input_ids=ids, labels=ids).loss.item() - dense)) < 1e-5


@pytest.mark.parametrize("iterative", [False, True])
def test_choose_blocks_removes_the_lowest_scores_and_renumbers_the_rest(iterative):
    model, ids = tiny_llama(layers=4), windows()
    first = depth.block_scores(copy.deepcopy(model), ids, "loss", progress=False)
    removed, rounds = depth.choose_blocks(model, ids, 2, "loss", iterative, progress=False)
    assert removed[0] == min(range(4), key=first.__getitem__) or removed[1] == min(range(4), key=first.__getitem__)
    assert len(rounds) == (2 if iterative else 1) and rounds[0]["scores"] == first
    assert model.config.num_hidden_layers == 2 and len(decoder_blocks(model)) == 2
    assert [b.self_attn.layer_idx for b in decoder_blocks(model)] == [0, 1]
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)  # the KV cache works


def test_drop_blocks_keeps_per_layer_config_lists_aligned():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  layer_types=["full_attention", "sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(config)
    depth.drop_blocks_(model, [1])
    assert model.config.layer_types == ["full_attention", "full_attention"]
    with pytest.raises(SlimlmError, match="every decoder layer"):
        depth.drop_blocks_(model, [0, 1])


def test_removing_units_without_compensation_equals_zeroing_them():
    model, ids = tiny_llama(), windows()
    block = decoder_blocks(model)[0]
    zeroed = copy.deepcopy(model)
    zblock = decoder_blocks(zeroed)[0]
    # KV group 1 of 2 holds query heads 2, 3 -> o_proj columns 32..63; MLP channels 5 and 70
    with torch.no_grad():
        zblock.self_attn.o_proj.weight[:, 32:] = 0
        zblock.mlp.down_proj.weight[:, [5, 70]] = 0
    keep_channels = torch.tensor([c for c in range(128) if c not in (5, 70)])
    width.shrink_block_(block, torch.tensor([0]), keep_channels, None, None)
    assert block.self_attn.q_proj.out_features == 32 and block.self_attn.k_proj.out_features == 16
    assert torch.allclose(logits(model, ids), logits(zeroed, ids), atol=1e-5)


def test_flap_compensation_is_exact_for_the_mean_input():
    torch.manual_seed(0)
    block = decoder_blocks(tiny_llama())[0]
    W, mean = block.mlp.down_proj.weight.detach().clone(), torch.randn(128)
    keep = torch.arange(0, 128, 3)
    width.shrink_block_(block, torch.tensor([0, 1]), keep, torch.zeros(64), mean)
    down = block.mlp.down_proj
    assert torch.allclose(down(mean[keep]), W @ mean, atol=1e-5)  # what the removed channels gave at their mean
    assert torch.count_nonzero(block.self_attn.o_proj.bias) == 0  # no attention unit removed: nothing moved


def test_flap_score_is_variance_times_squared_column_norm():
    X = torch.randn(200, 8) * torch.arange(1, 9)
    W = torch.randn(5, 8)
    stats = slimlm.core.stats.Accumulator(8, False, "cpu")
    stats.add(X)
    scores = width.column_scores("flap", W, stats.stats())
    assert torch.allclose(scores, X.var(0, unbiased=False) * W.square().sum(0), rtol=1e-4)


@pytest.mark.parametrize("allocation", widths.ALLOCATIONS)
def test_allocations_hit_the_parameter_target(allocation):
    model = tiny_llama(layers=3)
    before = parameter_counts(model)["decoder_linears"]
    method = "fisher" if allocation == "fisher" else "flap"
    result = shrink(model, calib=windows(8, 32), params=0.7, method=method, allocation=allocation, progress=False)
    weights = sum(m.weight.numel() for b in decoder_blocks(model) for m in b.modules()
                  if isinstance(m, torch.nn.Linear))
    channel = 3 * 64
    assert abs(weights - 0.7 * before) <= 1.5 * channel, allocation  # within one unit's rounding
    assert result.manifest["params_kept"] == pytest.approx(parameter_counts(model)["decoder_linears"] / before)
    assert all(w["kv_heads"] >= 1 and w["intermediate"] >= 1 for w in result.manifest["widths"])


def test_fisher_allocation_puts_the_cuts_where_the_estimated_loss_is_lowest():
    units = [width.BlockUnits(torch.tensor([5.0, 6.0]), torch.full((10,), 1.0), 100, 10),
             width.BlockUnits(torch.tensor([5.0, 6.0]), torch.full((10,), 0.01), 100, 10)]
    counts = widths.removal_counts(units, "fisher", 1 - 50 / 600)
    assert counts == [(0, 0), (0, 5)]


def test_a_planted_trap_in_the_width_costs_is_caught_and_the_figures_equal_a_re_measurement(monkeypatch):
    real = width.block_units

    def planted(model, method, stats, fisher=None):  # block 0's units called nearly free to remove
        units = real(model, method, stats, fisher)
        if method == "fisher":
            units[0].head_scores, units[0].channel_scores = units[0].head_scores * 1e-6, units[0].channel_scores * 1e-6
        return units
    monkeypatch.setattr(width, "block_units", planted)
    source, calib = trapped_llama(), windows(8, 64)
    model = copy.deepcopy(source)
    manifest = shrink(model, params=0.7, method="fisher", calib=calib, progress=False).manifest
    check = manifest["allocation_check"]
    assert check["plan"] > check["baseline"]  # the trap works: the planted plan measures worse than uniform widths
    figures = {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}
    assert check["kept"] != "plan" and figures[check["kept"]] == min(figures.values()) <= check["baseline"]
    held = calib[-4:]
    assert held_out_kld(source, model, held) == pytest.approx(figures[check["kept"]], rel=1e-4)
    uniform = copy.deepcopy(source)
    shrink(uniform, params=0.7, method="fisher", allocation="uniform", calib=calib[:-4], progress=False)
    assert held_out_kld(source, uniform, held) == pytest.approx(check["baseline"], rel=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(source.parameters(), trapped_llama().parameters()))


@pytest.mark.parametrize("shrink_args", [{"drop_layers": 1}, {"params": 0.6, "allocation": "uniform"},
                                         {"params": 0.6, "allocation": "flap"}])
def test_saved_results_reload_with_the_same_logits(tiny_folder, tmp_path, shrink_args):
    _, tok = slimlm.load_model(str(tiny_folder))
    model, ids = tiny_llama(layers=3, vocab=49152), windows(4, 32, 49152)
    result = shrink(model, tok, calib=ids, progress=False, **shrink_args)
    slimlm.save(model, tok, tmp_path / "run", result)
    reloaded, _ = slimlm.load_model(str(tmp_path / "run"))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    manifest = json.loads((tmp_path / "run" / "slimlm.json").read_text())
    per_layer = len({(w["kv_heads"], w["intermediate"]) for w in manifest.get("widths", [])}) > 1
    assert per_layer == (shrink_args.get("allocation") == "flap")
    assert ("structure" in manifest) == per_layer  # otherwise the config alone rebuilds it
    if not per_layer:  # plain transformers loads it too
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
        assert torch.equal(logits(plain, ids), logits(model, ids))


def test_slicegpt_shrink_keeps_at_most_the_target_and_reloads_only_through_slimlm(tiny_folder, tmp_path):
    _, tok = slimlm.load_model(str(tiny_folder))
    model, ids = tiny_llama(layers=3, vocab=49152), windows(4, 32, 49152)
    dense = parameter_counts(model)["decoder_linears"]
    per_hidden_unit = dense // 64  # every Llama linear has exactly one side on the residual stream
    result = shrink(model, tok, calib=ids, params=0.6, method="slicegpt", progress=False)
    kept = result.manifest["sliced_hidden"]
    assert parameter_counts(model)["decoder_linears"] == per_hidden_unit * kept + 3 * 2 * kept ** 2  # + skips
    assert result.manifest["params_kept"] <= 0.6 < (per_hidden_unit * (kept + 8) + 6 * (kept + 8) ** 2) / dense
    slimlm.save(model, tok, tmp_path / "run", result)
    reloaded, _ = slimlm.load_model(str(tmp_path / "run"))
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    manifest = json.loads((tmp_path / "run" / "slimlm.json").read_text())
    assert manifest["structure"]["config"]["hidden_size"] == kept and "model.layers.2.mlp_shortcut" in \
        manifest["structure"]["linears"]
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="mismatched"):  # it would otherwise drop the skip matrices silently
        AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    from slimlm.gguf.quantize import to_gguf

    with pytest.raises(SlimlmError, match="skip matrices"):
        to_gguf(reloaded, tok, tmp_path / "x.gguf", "F16", method="rtn", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_bad_inputs_are_refused():
    model = tiny_llama(layers=2)
    with pytest.raises(SlimlmError, match="between 1 and 1"):
        shrink(model, calib=windows(), drop_layers=2, progress=False)
    with pytest.raises(SlimlmError, match="in \\(0, 1\\)"):
        shrink(model, calib=windows(), params=1.2, progress=False)
    with pytest.raises(SlimlmError, match="one of the two"):
        shrink(model, calib=windows(), progress=False)
    with pytest.raises(SlimlmError, match="Llama-family"):
        shrink(tiny_opt(), calib=windows(), drop_layers=1, progress=False)
    with pytest.raises(SlimlmError, match="at least one attention head group"):
        width.shrink_block_(decoder_blocks(model)[0], torch.tensor([], dtype=torch.long), torch.arange(4), None, None)


@pytest.mark.parametrize("argv, message", [
    (["--drop-layers", "2"], "between 1 and 1"),
    (["--params", "1.5"], "in (0, 1)"),
    (["--params", "0.5", "--drop-layers", "1"], "one of the two"),
    (["--drop-layers", "1", "--method", "fisher"], "--method only applies with --params"),
    (["--params", "0.001"], "at least one attention head group"),
    (["--params", "0.5", "--method", "slicegpt", "--allocation", "fisher"], "allocation 'fisher' does not apply"),
    (["--params", "0.001", "--method", "slicegpt"], "SliceGPT cannot keep only 0.001"),
    (["--params", "0.5", "--method", "slicegpt", "--no-compensate"], "--no-compensate only applies with --method"),
])
def test_cli_bad_inputs_give_one_line_and_write_nothing(tiny_folder, tmp_path, data_dir, argv, message):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "slimlm", "shrink", str(tiny_folder), *argv, "--nsamples", "2",
                           "--seqlen", "16", "--data-dir", data_dir, "--out", str(out), "--quiet"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()
