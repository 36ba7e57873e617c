"""Long steps show progress on stderr and --quiet silences it; stdout's last line stays the JSON summary;
analyze records what each of its parts cost."""
import io
import json

import pytest
from tqdm.auto import tqdm

import slimlm
from slimlm.cli import _bars_off, main
from tests.conftest import tiny_llama

BAR = "%|"  # every tqdm bar line has it: "desc:  50%|█████     | 1/2 [...]"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2:4-pruned and a 4-bit (group 32, float16 scales: exact in GGUF) tiny Llama run."""
    root = tmp_path_factory.mktemp("runs")
    pruned, quantized = tiny_llama(), tiny_llama()
    return {"sparse": slimlm.save(pruned, None, root / "pruned", slimlm.prune(
                pruned, method="magnitude", pattern="2:4", progress=False)),
            "quantized": slimlm.save(quantized, None, root / "q4", slimlm.quantize(
                quantized, method="rtn", wbits=4, group_size=32, scale_dtype="float16", progress=False))}


@pytest.mark.parametrize("fmt,source,bar", [("sparse", "sparse", "sparse: 100%"),
                                            ("compressed-tensors", "quantized", "compressed-tensors: 100%"),
                                            ("gguf", "quantized", "gguf: 100%")])
def test_export_progress_goes_to_stderr_and_quiet_silences_it(capsys, tmp_path, runs, fmt, source, bar):
    out = tmp_path / ("model.gguf" if fmt == "gguf" else "out")
    summary, err = run_cli(capsys, "export", runs[source], "--format", fmt, "--out", out)
    assert summary["format"] == fmt and bar in err  # the bar ran to the end, on stderr
    summary, err = run_cli(capsys, "export", runs[source], "--format", fmt, "--out", tmp_path / f"quiet-{out.name}",
                           "--quiet")
    assert summary["format"] == fmt and BAR not in err  # warnings may remain (these runs have no tokenizer)


def test_data_free_runs_show_the_rotation_and_blocks_bars(capsys, tmp_path, tiny_folder):
    _, err = run_cli(capsys, "quantize", tiny_folder, "--method", "rtn", "--group-size", "32", "--rotate", "hadamard",
                     "--out", tmp_path / "q")
    assert "rotate: 100%" in err and "blocks: 100%" in err
    _, err = run_cli(capsys, "quantize", tiny_folder, "--method", "rtn", "--group-size", "32", "--out",
                     tmp_path / "q2", "--quiet")
    assert BAR not in err


PARTS = {"data", "spectra", "calibration_pass", "owl", "error_tables", "fisher_gradients", "fisher_tables", "plots"}


def test_analyze_records_each_part_and_prints_a_summary(capsys, tmp_path, tiny_folder, data_dir):
    args = ["analyze", tiny_folder, "--data-dir", data_dir, "--nsamples", "4", "--seqlen", "32"]
    summary, err = run_cli(capsys, *args, "--out", tmp_path / "a")
    for bar in ("spectra: 100%", "blocks: 100%", "fisher: 100%", "fisher tables: 100%"):
        assert bar in err, bar
    timings = json.loads((tmp_path / "a" / "slimlm.json").read_text())["timings"]
    assert set(timings) == PARTS | {"total"} and all(seconds > 0 for seconds in timings.values())
    assert sum(timings[p] for p in PARTS) <= timings["total"]  # disjoint parts of one wall-clock interval
    assert summary["seconds"] == round(timings["total"], 2)
    assert err.strip().splitlines()[-1].startswith(f"analyze took {timings['total']:.1f} s: data ")

    summary, err = run_cli(capsys, "analyze", tiny_folder, "--out", tmp_path / "b", "--quiet", "--no-calib")
    assert BAR not in err and "analyze took" not in err
    timings = json.loads((tmp_path / "b" / "slimlm.json").read_text())["timings"]
    assert set(timings) == {"data", "spectra", "plots", "total"}


def test_analyze_api_reports_timings_for_the_parts_it_ran():
    model, timings = tiny_llama(), {}
    slimlm.analyze(model, progress=False, timings=timings)
    assert set(timings) == {"spectra", "total"} and timings["spectra"] <= timings["total"]


def test_quiet_turns_off_bars_that_libraries_open_without_a_switch():
    """Inside _bars_off a bar opened with tqdm's defaults is disabled (as transformers' GGUF conversion and lm_eval's
    request building open theirs); one given disable= explicitly keeps it; afterwards the default is back."""
    with _bars_off():
        assert tqdm(range(2), file=io.StringIO()).disable
        assert not tqdm(range(2), file=io.StringIO(), disable=False).disable
    assert not tqdm(range(2), file=io.StringIO()).disable
