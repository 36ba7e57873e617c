"""GPTQ W4 against llm-compressor's GPTQModifier on the built-in model (issue #4), float32, CPU.

Our rows are the recipes recipes/llmcompressor/ours-*.yaml, run as `slimlm run` runs them (their eval step
left out: the parent evaluates every saved model the same way). Both tools get the same calibration windows
(the recipes' "first" windows of wikitext2 valid.tokens; llm-compressor receives them as a pre-tokenized
dataset, slimlm tokenizes the text in its run) and the same float32 model folder. Each compression runs in its
own fresh process, one after the other in one invocation, and is timed from process start to the saved model
(imports, model load, calibration, GPTQ, save). llm-compressor
runs in its own virtual environment (``--llmc-python``) through its public API only (``oneshot`` with a
``GPTQModifier``; its ``propagate_error=False`` is its one-pass mode, like our ``sequential=False``); its model
is saved uncompressed (fake-quantized float weights). Every saved model is then checked to lie on a 4-bit grid
(at most 16 distinct values per group of each decoder linear) and evaluated here with slimlm's perplexity
protocol (bench/common.py).

    python bench/llmcompressor_gptq.py --llmc-python /work/venvs/llmc/bin/python      # -> bench/results/
    python bench/llmcompressor_gptq.py --llmc-python ... --rows llmc-sym-g64,ours-sym-g64 --out /tmp/t.json

llm-compressor's environment: python3 -m venv /work/venvs/llmc; pip install --find-links /opt/wheels
torch==2.13.0; pip install llmcompressor (0.14.0.1, which pins transformers <= 5.17). It refuses group 128
on this model (576 columns are not a multiple of 128), hence group 64.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "llmcompressor"
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")
BITS, DAMP, BLOCKSIZE = 4, 0.01, 128  # llm-compressor's; slimlm's GPTQ defaults are the same damp and block size

# llm-compressor's rows: name -> settings (run in llm-compressor's environment)
LLMC = {
    "llmc-sym-g64": dict(group_size=64, symmetric=True, actorder=None),
    # llm-compressor's own one-pass mode: every layer calibrated on the unquantized model's activations
    "llmc-sym-g64-onepass": dict(group_size=64, symmetric=True, actorder=None, propagate_error=False),
    "llmc-sym-g64-actorder": dict(group_size=64, symmetric=True, actorder="weight"),
}


def ours_step(name: str, kind: str = "quantize"):
    """The quantize (or eval) step of our row ``name`` (recipes/llmcompressor/<name>.yaml)."""
    from slimlm.recipe import read_recipe

    (ns,) = [ns for k, ns in read_recipe(RECIPES / f"{name}.yaml").steps if k == kind]
    return ns


def protocol(names: list[str]):
    """(quantize step, eval step) of our rows, which must share calibration and evaluation: llm-compressor gets
    the same windows."""
    ours = [n for n in names if n not in LLMC] or row_names()[len(LLMC):]
    keys = ("calib", "nsamples", "seqlen", "calib_sampling", "seed")
    calibrations = {tuple(getattr(ours_step(n), k) for k in keys) for n in ours}
    evaluations = {tuple(vars(ours_step(n, "eval")).values()) for n in ours}
    if len(calibrations) != 1 or len(evaluations) != 1:
        raise SystemExit(f"our recipes {ours} differ in calibration or evaluation; the comparison needs one")
    return ours_step(ours[0]), ours_step(ours[0], "eval")


def settings(name: str) -> dict:
    """A row's grid and mode, in the table's terms."""
    if name in LLMC:
        return LLMC[name]
    ns = ours_step(name)
    return dict(group_size=ns.group_size, symmetric=not ns.asym, act_order=ns.act_order, sequential=not ns.one_pass)


def row_names() -> list[str]:
    return [*LLMC, *sorted(p.stem for p in RECIPES.glob("*.yaml"))]
BASELINE = [("ours-sym-g64", "llmc-sym-g64"),  # the issue's pair (both tools' defaults): ours / theirs
            ("ours-sym-g64-onepass", "llmc-sym-g64"),
            ("ours-sym-g64-onepass", "llmc-sym-g64-onepass"),  # both in one-pass mode
            ("ours-sym-g64-actorder", "llmc-sym-g64-actorder")]


# ---------------------------------------------------------------- children (one process per row)

def child_versions(*names: str) -> dict:
    from importlib.metadata import version
    return {n: version(n) for n in names}


def run_llmc(folder: str, calib_file: str, out: str, settings: dict) -> dict:
    """llm-compressor's public API only: oneshot + GPTQModifier, save uncompressed (float on the grid)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_file(calib_file)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = dict(num_bits=BITS, type="int", symmetric=settings["symmetric"], strategy="group",
                   group_size=settings["group_size"], actorder=settings["actorder"])
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                          ignore=["lm_head"], dampening_frac=DAMP, block_size=BLOCKSIZE,
                          actorder=settings["actorder"])
    start = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
            propagate_error=settings.get("propagate_error", True))
    compress_s = time.perf_counter() - start
    model.save_pretrained(out, save_compressed=False)
    tokenizer.save_pretrained(out)
    return {"compress_seconds": compress_s, "recipe": str(recipe.model_dump(exclude_none=True)),
            "versions": child_versions("llmcompressor", "compressed-tensors", "transformers", "torch", "datasets")}


def run_ours(name: str, data_dir: str, out: str) -> dict:
    """Our row's recipe as `slimlm run` runs it, writing the run to ``out``, without its eval step."""
    from slimlm.pipeline import execute
    from slimlm.recipe import Recipe, RunOptions, read_recipe, relocated

    recipe = read_recipe(RECIPES / f"{name}.yaml").with_run(data_dir=data_dir)  # a location, not a setting
    execute(relocated(Recipe(recipe.run, tuple(s for s in recipe.steps if s[0] != "eval")), out),
            RunOptions(quiet=True))
    manifest = json.loads((Path(out) / "slimlm.json").read_text())
    return {"compress_seconds": manifest["timings"]["total"],
            "versions": child_versions("slimlm", "transformers", "torch")}


def child_main(args) -> None:
    t0 = time.perf_counter()
    row = (run_llmc(args.folder, args.calib_file, args.child_out, LLMC[args.child]) if args.child in LLMC else
           run_ours(args.child, args.data_dir, args.child_out))
    row.update(in_process_seconds=time.perf_counter() - t0,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row))


# ---------------------------------------------------------------- parent: calibrate, time, check, evaluate

def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" load average")[0].strip()


def timed_child(python: str, name: str, args, workdir: Path) -> dict:
    """Run one row in a fresh process; wall seconds from process start to saved model."""
    out = workdir / name
    cmd = [python, __file__, "--child", name, "--folder", args.folder, "--data-dir", args.data_dir,
           "--calib-file", str(workdir / "calib.safetensors"), "--child-out", str(out)]
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": name, "tool": "llmc" if name in LLMC else "ours", "settings": settings(name), "seconds": wall,
            "load_before": load_before, "load_after": load_average(), **row, "out": str(out)}


def grid_check(state: dict, linears: list[str], group_size: int) -> dict:
    """Distinct values per (row, group) of every decoder linear: a 4-bit grid allows at most 16."""
    worst = 0
    for fqn in linears:
        w = state[fqn + ".weight"]
        groups = w.reshape(w.shape[0], -1, group_size).sort(-1).values
        distinct = (groups[..., 1:] != groups[..., :-1]).sum(-1) + 1
        worst = max(worst, int(distinct.max()))
    return {"max_distinct_per_group": worst, "on_grid": worst <= 2**BITS}


def load_saved(folder: str, out: str):
    """The base model with the decoder weights of a saved run (any format's extra tensors ignored)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    saved = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        saved |= load_file(f)
    expected = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = [k for k in expected if k not in saved and k not in tied]
    if missing:
        raise SystemExit(f"{out} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict({k: saved[k].to(torch.float32) for k in expected if k in saved}, strict=False)
    if tied:
        model.tie_weights()
    return model, saved


def evaluate_row(row: dict, folder: str, test) -> dict:
    from slimlm.evaluation.perplexity import perplexity
    from slimlm.core.architectures import linear_fqns

    model, saved = load_saved(folder, row["out"])
    grid = grid_check(saved, list(linear_fqns(model)), row["settings"]["group_size"])
    ppl = perplexity(model, test, progress=False)
    return {**grid, "perplexity": ppl.perplexity, "eval_windows": ppl.windows, "eval_tokens_per_s": ppl.tokens_per_s}


def markdown(rows: list[dict], meta: dict) -> str:
    by_name = {r["row"]: r for r in rows}
    lines = ["| row | tool | grid | perplexity | wall s (start to saved) | GPTQ s (in process) | peak RSS MB | "
             "max distinct / group | load avg before / after |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["settings"]
        order = "act-order" if s.get("act_order") or s.get("actorder") else "no act-order"
        one_pass = s.get("sequential") is False or s.get("propagate_error") is False
        grid = f"W4 {'sym' if s['symmetric'] else 'asym'} g{s['group_size']}, {order}{', one pass' * one_pass}"
        lines.append(f"| {r['row']} | {r['tool']} | {grid} | {r['perplexity']:.3f} | {r['seconds']:.1f} | "
                     f"{r['compress_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['max_distinct_per_group']} | "
                     f"{r['load_before']} / {r['load_after']} |")
    for ours, theirs in BASELINE:
        if ours in by_name and theirs in by_name:
            a, b = by_name[ours], by_name[theirs]
            lines.append(f"\n{ours} / {theirs}: perplexity {a['perplexity']:.3f} vs {b['perplexity']:.3f} "
                         f"(ratio {a['perplexity'] / b['perplexity']:.4f}); wall time {a['seconds']:.1f} s vs "
                         f"{b['seconds']:.1f} s (ratio {a['seconds'] / b['seconds']:.3f}).")
    lines.append(f"\nCalibration {meta['nsamples']} x {meta['seqlen']} tokens ('first' windows), evaluation "
                 f"{meta['eval_windows']} x 2048 tokens; versions: {json.dumps(meta['versions'])}; load average "
                 f"(1, 5, 15 min) at start / end: {' / '.join(meta['load_average_start_end'])}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python",
                   help="python of the virtual environment where llmcompressor is installed")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--rows", help="comma-separated rows (default: llm-compressor's and every recipe of ours)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows instead of the recipes'")
    p.add_argument("--out", default=str(RESULTS / "llmcompressor_gptq.json"))
    for hidden in ("--child", "--folder", "--calib-file", "--child-out"):  # internal: one row in this process
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)

    from safetensors.torch import save_file

    import slimlm
    from common import protocol_windows, write_json
    from slimlm.core.cache import gguf_to_folder
    from slimlm.core.models import builtin_gguf

    names = args.rows.split(",") if args.rows else row_names()
    step, evaluation = protocol(names)
    args.eval_windows = args.eval_windows or evaluation.eval_windows
    args.folder = str(gguf_to_folder(builtin_gguf("smollm2-135m")))
    _, tokenizer = slimlm.load_model("smollm2-135m")
    calib = slimlm.calibration(tokenizer, step.calib, step.nsamples, step.seqlen, step.calib_sampling, step.seed,
                               args.data_dir)
    _, test = protocol_windows(tokenizer, args.data_dir, 1, args.eval_windows)
    rows, load_start = [], load_average()
    with tempfile.TemporaryDirectory(prefix="llmc-gptq-") as tmp:
        workdir = Path(tmp)
        save_file({"input_ids": calib.contiguous()}, workdir / "calib.safetensors")
        for name in names:  # compress all first, back to back, so timings share conditions
            python = args.llmc_python if name in LLMC else sys.executable
            rows.append(timed_child(python, name, args, workdir))
            print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            row.update(evaluate_row(row, args.folder, test))
            print(json.dumps({k: row[k] for k in ("row", "perplexity", "max_distinct_per_group")}), flush=True)
    versions = {r["tool"]: r.pop("versions") for r in rows}
    meta = {"nsamples": step.nsamples, "seqlen": step.seqlen, "eval_windows": args.eval_windows,
            "bits": BITS, "damp": DAMP, "blocksize": BLOCKSIZE, "versions": versions,
            "load_average_start_end": [load_start, load_average()]}
    for r in rows:
        r.pop("out")
    out = write_json(args.out, rows)
    data = json.loads(out.read_text())
    out.write_text(json.dumps({**data, "settings": meta}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, meta) + "\n")
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
