"""End to end on the built-in SmolLM2-135M with tiny calibration and evaluation slices."""
import pytest
import torch

import slimlm
from slimlm.core.data import eval_windows, load_text, tokenize
from slimlm.core.engine import capture_inputs, run_block
from slimlm.evaluation.perplexity import perplexity
from slimlm.core.architectures import decoder_blocks

pytestmark = pytest.mark.slow
CALIB = dict(nsamples=8, seqlen=128, sampling="first")


@pytest.fixture(scope="module")
def eval_ids(builtin_folder, data_dir):
    _, tokenizer = slimlm.load_model(str(builtin_folder))
    return eval_windows(tokenize(load_text("wikitext2", "test", data_dir)[:20000], tokenizer), 256, 3)


@torch.no_grad()
def test_block_replay_matches_full_forward(builtin_folder, eval_ids):
    model, _ = slimlm.load_model(str(builtin_folder))
    ids = eval_ids[:2, :64]
    expected = model.base_model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    captured = capture_inputs(model, ids, batch_size=2, device="cpu")
    x = captured.hidden
    for i, block in enumerate(decoder_blocks(model)[:-1]):
        x = run_block(block, x, captured.call_args[i], batch_size=2)
        assert (x - expected[i + 1]).abs().max().item() == 0.0


def test_prune_save_reload_gives_same_logits(builtin_folder, data_dir, tmp_path, eval_ids):
    from transformers import AutoModelForCausalLM

    model, tokenizer = slimlm.load_model(str(builtin_folder))
    result = slimlm.prune(model, tokenizer, method="wanda", sparsity=0.5, data_dir=data_dir, progress=False, **CALIB)
    assert abs(result.manifest["sparsity"] - 0.5) < 1e-3
    out = slimlm.save(model, tokenizer, tmp_path / "run", result)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        a = model(input_ids=eval_ids[:1]).logits
        b = reloaded(input_ids=eval_ids[:1]).logits
    assert torch.equal(a, b)
    for name, p in reloaded.named_parameters():
        if name.endswith("down_proj.weight"):
            assert (p == 0).float().mean().item() >= 0.5 - 1e-6


@pytest.fixture(scope="module")
def perplexities(builtin_folder, data_dir, eval_ids):
    results = {}
    for method in ("dense", "magnitude", "wanda", "sparsegpt"):
        model, tokenizer = slimlm.load_model(str(builtin_folder))
        if method != "dense":
            slimlm.prune(model, tokenizer, method=method, sparsity=0.5, data_dir=data_dir, progress=False, **CALIB)
        results[method] = perplexity(model, eval_ids, progress=False).perplexity
    return results


def test_perplexity_finite_and_ordered(perplexities):
    p = perplexities
    assert all(v == v and v < float("inf") for v in p.values()), p
    assert p["dense"] < min(p["wanda"], p["sparsegpt"]), p
    assert max(p["wanda"], p["sparsegpt"]) < p["magnitude"], p


def test_same_seed_gives_bit_identical_weights(builtin_folder, data_dir):
    weights = []
    for _ in range(2):
        model, tokenizer = slimlm.load_model(str(builtin_folder))
        slimlm.prune(model, tokenizer, method="sparsegpt", pattern="2:4", data_dir=data_dir, progress=False,
                     nsamples=4, seqlen=64, sampling="random", seed=7)
        weights.append(model.model.layers[3].mlp.down_proj.weight.clone())
    assert torch.equal(weights[0], weights[1])


def test_allocation_end_to_end(builtin_folder, data_dir):
    """Analyse the real model, allocate with each allocator, prune with the map: global target holds."""
    from slimlm.allocate import allocate_from_metrics

    model, tokenizer = slimlm.load_model(str(builtin_folder))
    calib = slimlm.calibration(tokenizer, "wikitext2", 4, 64, "first", data_dir=data_dir)
    metrics = slimlm.analyze(model, calib, error_levels=(0.0, 0.5, 0.6, 0.7, 0.8, 0.9), progress=False)
    assert len(metrics) == 30 * 7 and all(1.0 < r["alpha"] < 20 for r in metrics.values())
    sizes = {n: r["size"] for n, r in metrics.items()}
    maps = {a: allocate_from_metrics(metrics, a, 0.7) for a in ("owl", "alphapruning", "errortable", "fisher")}
    for name, budgets in maps.items():
        mean = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
        assert abs(mean - 0.7) <= 0.7e-3 and all(0 <= b <= 0.99 for b in budgets.values()), name
        assert max(budgets.values()) > min(budgets.values()), name  # really non-uniform
    result = slimlm.prune(model, tokenizer, method="wanda", budgets=maps["fisher"], calib=calib, progress=False)
    assert abs(result.manifest["sparsity"] - 0.7) < 2e-3
