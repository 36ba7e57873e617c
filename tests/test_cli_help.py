"""CLI habits: --version, --help that shows defaults in plain text, options without effect refused, the allocate
summary table, and the evaluation plan printed before a long perplexity run."""
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slimlm.cli import main
from tests.conftest import REPO

COMMANDS = ("prune", "quantize", "analyze", "allocate", "export", "eval", "report")


def help_text(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """Each option's invocation (``--nsamples NSAMPLES``) -> its help text, from a --help output (the help
    follows on the same line after two spaces or more, or on the next, indented line)."""
    options = text.split("options:\n", 1)[1].split("\n\n")[0]
    entries = [re.split(r"\s{2,}", e.strip(), maxsplit=1) for e in re.split(r"\n(?=  -)", options)]
    return {e[0]: " ".join(e[1].split()) if len(e) > 1 else "" for e in entries}


def test_version(capsys):
    from slimlm.version import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"slimlm {__version__}\n"
    assert __version__ == "0.1.0"


@pytest.mark.parametrize("command,option,default", [
    ("prune", "--nsamples NSAMPLES", "128"), ("prune", "--seqlen SEQLEN", "2048"),
    ("prune", "--eval-seqlen EVAL_SEQLEN", "2048"), ("prune", "--seed SEED", "0"),
    ("prune", "--method METHOD", "wanda"), ("quantize", "--wbits WBITS", "4"),
    ("analyze", "--nsamples NSAMPLES", "32"), ("analyze", "--seqlen SEQLEN", "512"),
    ("allocate", "--target TARGET", "sparsity=0.7"), ("export", "--gguf-type GGUF_TYPE", "auto"),
    ("eval", "--eval-seqlen EVAL_SEQLEN", "2048"), ("eval", "--batch-size BATCH_SIZE", "1"),
])
def test_help_shows_defaults(capsys, monkeypatch, command, option, default):
    assert option_entries(help_text(capsys, monkeypatch, command))[option].endswith(f"(default: {default})")


@pytest.mark.parametrize("command", ("",) + COMMANDS)
def test_help_is_plain_text_and_every_option_explained(capsys, monkeypatch, command):
    text = help_text(capsys, monkeypatch, *([command] if command else []))
    assert "`" not in text and "``" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    entries = option_entries(text)
    assert "--help" in " ".join(entries) and not [o for o, h in entries.items() if not h], entries
    if command:  # each command's --help starts with what it does
        assert text.split("\n\n")[1].strip()


def test_eval_windows_help_says_the_default_is_every_window(capsys, monkeypatch):
    assert option_entries(help_text(capsys, monkeypatch, "eval"))["--eval-windows N"].startswith(
        "evaluate the first N windows only (default: every window of the test text")


@pytest.mark.parametrize("argv,message", [
    (["prune", "m", "--ria-alpha", "0.3"], "--ria-alpha only applies with --method ria"),
    (["prune", "m", "--eval-windows", "4"], "--eval-windows only applies with --eval"),
    (["prune", "m", "--pattern", "2:4", "--method", "sparsegpt", "--permute"], "--permute only applies with"),
    (["prune", "m", "--asym"], "--asym only applies with --wbits"),
    (["prune", "m", "--owl-lambda", "0.1"], "--owl-lambda only applies with --allocation owl"),
    (["quantize", "m", "--method", "rtn", "--act-order"], "--act-order only applies with --method gptq"),
    (["quantize", "m", "--act-clip", "0.9"], "--act-clip only applies with --abits"),
    (["analyze", "m", "--out", "o", "--no-calib", "--nsamples", "8"], "--nsamples only applies with a calib"),
    (["allocate", "a", "--alpha-epsilon", "0.3"], "--alpha-epsilon only applies with --allocation alphapruning"),
    (["export", "r", "--format", "sparse", "--out", "o", "--gguf-type", "f16"], "--gguf-type only applies"),
    (["eval", "m", "--limit", "5"], "--limit only applies with --tasks"),
    (["eval", "./folder", "--no-cache"], "--no-cache only applies with a .gguf model or the built-in one"),
    (["eval", "m", "--tasks", "piqa", "--eval-windows", "4"], "--eval-windows only applies with perplexity"),
    (["eval", "f.gguf", "--engine", "llama.cpp", "--no-cache"], "--no-cache only applies with --engine transformers"),
    (["eval", "f.gguf", "--threads", "4"], "--threads only applies with --engine llama.cpp"),
    (["gguf", "m", "--out", "o.gguf", "--device", "cuda"], "--device only applies with prune, quantize or analyze"),
    (["gguf", "m", "--out", "o.gguf", "--method", "rtn", "--size", "6bpw", "--batch-size", "2"],
     "--batch-size only applies with --method gptq or --imatrix"),
    (["gguf", "m", "--out", "o.gguf", "--method", "rtn", "--nsamples", "8"], "--nsamples only applies with"),
    (["quantize", "m", "--alpha", "0.5"], "--alpha only applies with --transform smoothquant, duquant or flatquant"),
    (["quantize", "m", "--intact-kv", "bos", "--intact-prefix", "hi"],
     "--intact-prefix only applies with --intact-kv prefix"),
    (["quantize", "m", "--kv-clip", "0.9"], "--kv-clip only applies with --kvbits"),
    (["quantize", "m", "--act-grid", "asym"], "--act-grid only applies with --abits"),
    (["quantize", "m", "--lwc"], "--lwc only applies with --transform duquant"),
    (["quantize", "m", "--calibrate-kv"], "--calibrate-kv only applies with --intact-kv"),
    (["quantize", "m", "--transform", "duquant", "--epochs", "3"], "--epochs only applies with --transform flatquant"),
])
def test_options_without_effect_are_refused(capsys, argv, message):
    """Refused by the step's config (a return code) or by the command's parser (an exit): one line either way."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"slimlm: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    ["prune", "m", "--method", "ria", "--ria-alpha", "0.3", "--eval", "--eval-windows", "4"],
    ["prune", "m", "--pattern", "2:4", "--method", "ria", "--permute", "--wbits", "4", "--asym"],
    ["prune", "m", "--eval-seqlen", "2048"],  # its default: no different from not giving it
    ["quantize", "m", "--avg-bits", "3.5", "--allocation", "owl", "--owl-lambda", "0.1", "--abits", "4",
     "--act-clip", "0.9"],
    ["eval", "m", "--tasks", "piqa", "--ppl", "--eval-windows", "4", "--limit", "5"],
    ["export", "r", "--format", "gguf", "--out", "o", "--gguf-type", "f16", "--inexact"],
    ["eval", "q4.gguf", "--no-cache"],
    ["prune", "smollm2-135m", "--no-cache"],
])
def test_options_with_effect_are_accepted(argv):
    from slimlm.cli.parser import build_parser

    assert build_parser().parse_args(argv).command == argv[0]


@pytest.fixture
def analysis(tmp_path):
    """An analysis folder of a made-up 3-block model with two linear kinds of different sizes, whose error tables
    (convex, steeper for some linears) make errortable give every linear its own budget."""
    kinds = {"self_attn.q_proj": 100, "mlp.down_proj": 300}
    levels = [i / 20 for i in range(20)]
    records = [{"name": f"model.layers.{b}.{kind}", "block": b, "kind": kind, "size": size,
                "errors": {str(level): (1 + b + 3 * i) * level ** 2 for level in levels}}
               for b in range(3) for i, (kind, size) in enumerate(kinds.items())]
    (tmp_path / "metrics.json").write_text(json.dumps(records))
    return tmp_path


def test_allocate_prints_a_summary_table(capsys, tmp_path, analysis):
    out = tmp_path / "map.json"
    assert main(["allocate", str(analysis), "--allocation", "errortable", "--target", "sparsity=0.6",
                 "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    budgets = json.loads(out.read_text())
    sizes = {n: 100 if n.endswith("q_proj") else 300 for n in budgets}
    mean = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
    assert all(budgets[f"model.layers.{b}.self_attn.q_proj"] != budgets[f"model.layers.{b}.mlp.down_proj"]
               for b in range(3))  # so a block's mean is a weighted one
    assert f"parameter-weighted mean {mean:.4f} over 6 linears" in lines[0] and abs(mean - 0.6) < 1e-3
    assert f"min {min(budgets.values()):.3f}, max {max(budgets.values()):.3f}" in lines[0]
    assert lines[1].split() == ["block", "mean", "q_proj", "down_proj"]
    for block, line in enumerate(lines[2:5]):
        q, down = budgets[f"model.layers.{block}.self_attn.q_proj"], budgets[f"model.layers.{block}.mlp.down_proj"]
        assert line.split() == [str(block), f"{(q * 100 + down * 300) / 400:.3f}", f"{q:.3f}", f"{down:.3f}"]
    assert lines[5] == f"budget map written to {out} (plot: {out.with_suffix('.png')})" and len(lines) == 6


def test_allocate_json_prints_the_whole_map(capsys, tmp_path, analysis):
    assert main(["allocate", str(analysis), "--allocation", "errortable", "--target", "sparsity=0.6",
                 "--out", str(tmp_path / "map.json"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["budgets"] == json.loads((tmp_path / "map.json").read_text())
    assert printed["allocation"] == "errortable" and abs(printed["sparsity"] - 0.6) < 1e-3


@pytest.fixture(scope="module")
def short_text(tmp_path_factory, tiny_folder, data_dir):
    """A short test text and its number of 64-token windows."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("text") / "test.txt"
    path.write_text((Path(data_dir) / "wikitext2" / "test.raw").read_text(encoding="utf-8")[:3000])
    tokens = len(AutoTokenizer.from_pretrained(tiny_folder)(path.read_text())["input_ids"])
    return path, tokens // 64


def test_eval_prints_its_plan_and_an_estimate_first(tiny_folder, short_text):
    text, windows = short_text
    done = subprocess.run([sys.executable, "-m", "slimlm", "eval", str(tiny_folder), "--eval-dataset",
                           str(text), "--eval-seqlen", "64"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["windows"] == windows > 1
    plan = f"perplexity on {text}: {windows} windows x 64 tokens = {windows * 64} tokens (every window of the " \
           "test text; --eval-windows N"
    assert plan in done.stderr
    assert re.search(rf"1 of {windows} windows in [0-9.]+ s: ~[0-9.]+ (s|min|h) for all {windows}\n", done.stderr)
    assert done.stderr.index(plan) < done.stderr.index(f"1 of {windows} windows in")


def test_eval_plan_of_a_limited_run_and_quiet(caplog, capsys, tiny_folder, short_text):
    text, windows = short_text
    argv = ["eval", str(tiny_folder), "--eval-dataset", str(text), "--eval-seqlen", "64",
            "--eval-windows", "2", "--batch-size", "2"]
    with caplog.at_level(logging.INFO, logger="slimlm"):
        assert main(argv) == 0
        assert [r.getMessage() for r in caplog.records if r.name.startswith("slimlm")] == [
            f"perplexity on {text}: 2 windows x 64 tokens = 128 tokens (the first 2 of {windows})"]  # one batch
        caplog.clear()
        assert main(argv + ["--quiet"]) == 0
        assert not [r for r in caplog.records if r.name.startswith("slimlm")]


def test_evaluate_refuses_empty_windows(tiny_folder, data_dir, capsys):
    for flag, value, message in (("--eval-windows", "0", "at least 1"), ("--eval-seqlen", "1", "at least 2")):
        code = main(["eval", str(tiny_folder), "--data-dir", data_dir, flag, value, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1
