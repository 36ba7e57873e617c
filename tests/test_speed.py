"""slimlm.evaluation.speed on tiny models: greedy decoding yields generate's tokens, one measurement of a model, itself
and its half-depth version gives positive finite numbers, ratios near 1 against itself and fewer parameters for the
half; bad input is one SlimlmError; llama-bench (where the llama.cpp tools are built) on a Q8_0 file of the model.

Threads are 1 here: on 2 cores shared with other jobs, 2 threads spin at every barrier while a core is taken and
the tiny model's steps take 100x longer, at random."""
import math
import os
import resource

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.evaluation.speed import _noise_warnings, _round_ranges, greedy, main, measure_speed, prompt_ids
from slimlm.evaluation.speed_table import format_table
from tests.conftest import llama_cpp_tools, tiny_llama

FAST = {"prompt_tokens": 16, "new_tokens": 4, "repeats": 1, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def half_folder(tiny_folder, tmp_path_factory):
    """tiny_folder's model with half its layers, and its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("half")
    tiny_llama(layers=1, vocab=49152).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def result(tiny_folder, half_folder):
    """One measurement (three fresh processes): the tiny model as baseline, itself again, its half-depth version."""
    return measure_speed([str(tiny_folder), str(tiny_folder), str(half_folder)], "transformers", **FAST)


def timings(entry: dict) -> list:
    return [entry["prefill_tok_s"], entry["ttft_s"], *entry["decode_tok_s"].values()]


def test_greedy_makes_new_tokens_as_generate_does(llama):
    ids = prompt_ids(llama.config.vocab_size, 2, 16)
    tokens, prefill_s, decode_s = greedy(llama, ids, 4)
    expected = llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=4,
                              max_new_tokens=4, pad_token_id=0)
    assert tokens.shape == (2, 4)
    assert torch.equal(tokens, expected[:, 16:])
    assert prefill_s > 0 and decode_s > 0


def test_prompts_are_the_same_every_time():
    ids = prompt_ids(100, 2, 8)
    assert torch.equal(ids, prompt_ids(100, 2, 8))
    assert ids.shape == (2, 8) and 0 <= int(ids.min()) and int(ids.max()) < 100


def test_results_are_positive_and_finite(result):
    assert result["settings"]["batches"] == [1, 8] and result["baseline"] == result["models"][0]["model"]
    for entry in result["models"]:
        for value in [*timings(entry), entry["peak_rss_bytes"], entry["params"], entry["size_bytes"]]:
            assert value > 0 and math.isfinite(value)
        assert entry["nonzero_params"] <= entry["params"] and entry["peak_cuda_bytes"] is None
        assert len(entry["samples"]["prefill_tok_s"]) == 1


def test_a_model_against_itself(result):
    baseline, again = result["models"][:2]
    ratios = again["ratios"]
    assert "ratios" not in baseline
    assert ratios["params"] == ratios["size_bytes"] == 1
    # timings of one round on a shared machine can differ by any factor (the warnings say so): the ratios must be
    # the medians' quotients; memory, which load does not move, stays near 1
    assert ratios["prefill_tok_s"] == again["prefill_tok_s"] / baseline["prefill_tok_s"]
    assert ratios["ttft_s"] == again["ttft_s"] / baseline["ttft_s"]
    assert ratios["decode_tok_s"] == {b: again["decode_tok_s"][b] / baseline["decode_tok_s"][b]
                                      for b in baseline["decode_tok_s"]}
    assert 0.2 < ratios["peak_rss_bytes"] < 5


def test_half_depth_has_fewer_params(result):
    full, half = result["models"][0], result["models"][2]
    assert half["params"] < full["params"] and half["size_bytes"] < full["size_bytes"]
    assert half["ratios"]["params"] == half["params"] / full["params"]


def test_table(result):
    lines = format_table(result).splitlines()
    assert "median of 1" in lines[0] and lines[5].startswith("higher is better: prefill and decode tok/s")
    assert "warning: 1 round(s): no spread" in lines[6]  # one round cannot show its noise
    assert lines[1].split()[:2] == ["model", "params"] and "decode b8" in lines[1] and "x peak" in lines[1]
    assert lines[2].startswith(result["baseline"]) and lines[2].rstrip().endswith("-")  # no ratios to itself


def test_progress_lines(tiny_folder, caplog):
    caplog.set_level("INFO", logger="slimlm.evaluation.speed")
    measure_speed([str(tiny_folder)], batches=(1,), **{**FAST, "progress": True})
    assert f"speed: {tiny_folder}, round 1 of 1" in caplog.text


@pytest.mark.parametrize("models, options, message", [
    (["/no/such/model"], {}, "cannot read model"),
    (["/no/such/model.gguf"], {}, "not found"),
    ([], {}, "at least one model"),
    (["MODEL"], {"engine": "vllm"}, "unknown engine"),
    (["MODEL"], {"engine": "llama.cpp"}, "runs .gguf files"),
    (["/no/such/model.gguf"], {"engine": "llama.cpp"}, "not found"),
    (["MODEL"], {"new_tokens": 1}, "new_tokens must be at least 2"),
    (["MODEL"], {"batches": (0, 8)}, "batch sizes must be positive"),
    (["MODEL"], {"dtype": "float8"}, "unknown dtype"),
])
def test_bad_input(tiny_folder, models, options, message):
    models = [str(tiny_folder) if m == "MODEL" else m for m in models]
    with pytest.raises(SlimlmError, match=message):
        measure_speed(models, **{**FAST, **options})


def test_a_failing_round_is_one_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path), "--prompt-tokens", "4", "--new-tokens", "2", "--batches", "1", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimlm: error: ") and "\n" not in err


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_tools("llama-bench")


@pytest.fixture(scope="module")
def tiny_gguf(llama_cpp, tiny_folder, tmp_path_factory):
    from slimlm.core.models import load_model
    from slimlm.gguf.quantize import to_gguf

    model, tok = load_model(str(tiny_folder))
    return to_gguf(model, tok, tmp_path_factory.mktemp("gguf") / "tiny-q8_0.gguf", "Q8_0", method="rtn",
                   progress=False)


def test_llama_bench(tiny_gguf):
    """Timing ratios are not held to a band here: a llama-bench run of this model takes well under a millisecond,
    so one preemption by another job makes it 10x slower."""
    result = measure_speed([str(tiny_gguf), str(tiny_gguf)], "llama.cpp", **FAST)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for entry in result["models"]:
        for value in [entry["prefill_tok_s"], entry["ttft_s"], entry["decode_tok_s"]["1"], entry["decode_tok_s"]["8"],
                      entry["params"]]:  # batch 8: llama-batched-bench
            assert value > 0 and math.isfinite(value)
        assert entry["size_bytes"] == os.path.getsize(tiny_gguf)
        assert 0 < entry["peak_rss_bytes"] < own_peak  # llama-bench's own peak, not this process's carried over
    ratios = result["models"][1]["ratios"]
    assert ratios["params"] == ratios["size_bytes"] == 1 and 0.2 < ratios["peak_rss_bytes"] < 5
    assert ratios["decode_tok_s"]["8"] > 0 and ratios["decode_tok_s"]["1"] > 0
    assert format_table(result).splitlines()[2].split()[6] != "-"  # decode b8 measured


def test_ratios_whose_rounds_fall_on_both_sides_of_one_are_called_noise():
    """Per-round ratios pair each round with the baseline's same round; a span across 1 is flagged."""
    def entry(name, prefill, decode):
        return {"model": name, "samples": {"prefill_tok_s": prefill, "ttft_s": [1.0, 1.0, 1.0],
                                           "decode_tok_s": [{"1": d} for d in decode]}, "decode_tok_s": {"1": 1.0}}
    base = entry("base", [100.0, 50.0, 100.0], [10.0, 10.0, 10.0])
    other = entry("other", [120.0, 45.0, 130.0], [20.0, 22.0, 21.0])
    other["round_ranges"] = _round_ranges(other, base)
    assert other["round_ranges"]["prefill_tok_s"] == [0.9, 1.3]
    assert other["round_ranges"]["decode_tok_s"]["1"] == [2.0, 2.2]
    warnings = _noise_warnings([base, other], repeats=3)
    assert any("other" in w and "prefill" in w and "decode" not in w for w in warnings)
    assert not any("no spread" in w for w in warnings)
