"""GPTQ W4 against llm-compressor's GPTQModifier on the built-in model (issue #4), float32, CPU.

Both tools get the same calibration windows (slimlm's "first" windows of wikitext2 valid.tokens, saved
once as token ids; llm-compressor receives them as a pre-tokenized dataset) and the same float32 model
folder. Each compression runs in its own fresh process, one after the other in one invocation, and is
timed from process start to the saved model (imports, model load, calibration, GPTQ, save). llm-compressor
runs in its own virtual environment (``--llmc-python``) through its public API only (``oneshot`` with a
``GPTQModifier``; its ``propagate_error=False`` is its one-pass mode, like our ``sequential=False``); its model
is saved uncompressed (fake-quantized float weights). Every saved model is then checked to lie on a 4-bit grid
(at most 16 distinct values per group of each decoder linear) and evaluated here with slimlm's perplexity
protocol (bench/common.py).

    python bench/llmcompressor_gptq.py --llmc-python /work/venvs/llmc/bin/python      # -> bench/results/
    python bench/llmcompressor_gptq.py --llmc-python ... --nsamples 4 --seqlen 128 --eval-windows 1 --out /tmp/t.json

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
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")
BITS, DAMP, BLOCKSIZE = 4, 0.01, 128

# name -> (tool, settings); "llmc-*" rows run in llm-compressor's environment
ROWS = {
    "llmc-sym-g64": ("llmc", dict(group_size=64, symmetric=True, actorder=None)),
    # llm-compressor's own one-pass mode: every layer calibrated on the unquantized model's activations
    "llmc-sym-g64-onepass": ("llmc", dict(group_size=64, symmetric=True, actorder=None, propagate_error=False)),
    "ours-sym-g64": ("ours", dict(group_size=64, symmetric=True, act_order=False)),
    "ours-sym-g64-onepass": ("ours", dict(group_size=64, symmetric=True, act_order=False, sequential=False)),
    "llmc-sym-g64-actorder": ("llmc", dict(group_size=64, symmetric=True, actorder="weight")),
    "ours-sym-g64-actorder": ("ours", dict(group_size=64, symmetric=True, act_order=True)),
    "ours-asym-g64-actorder": ("ours", dict(group_size=64, symmetric=False, act_order=True)),
    "ours-asym-g32-actorder": ("ours", dict(group_size=32, symmetric=False, act_order=True)),
}
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


def run_ours(calib_file: str, out: str, settings: dict) -> dict:
    """slimlm's Python API with the same windows: load, GPTQ (1% damp, 128-column blocks), save."""
    from safetensors.torch import load_file

    import slimlm

    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib = load_file(calib_file)["input_ids"]
    result = slimlm.quantize(model, tokenizer, method="gptq", wbits=BITS, group_size=settings["group_size"],
                             symmetric=settings["symmetric"], act_order=settings["act_order"], calib=calib,
                             sampling="first", blocksize=BLOCKSIZE, damp=DAMP, progress=False,
                             sequential=settings.get("sequential", True))
    slimlm.save(model, tokenizer, out, result)
    return {"compress_seconds": result.manifest["timings"]["total"],
            "versions": child_versions("slimlm", "transformers", "torch")}


def child_main(args) -> None:
    tool, settings = ROWS[args.child]
    t0 = time.perf_counter()
    row = (run_llmc(args.folder, args.calib_file, args.child_out, settings) if tool == "llmc" else
           run_ours(args.calib_file, args.child_out, settings))
    row.update(in_process_seconds=time.perf_counter() - t0,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row))


# ---------------------------------------------------------------- parent: calibrate, time, check, evaluate

def load_average() -> str:
    return Path("/proc/loadavg").read_text().split(" load average")[0].strip()


def timed_child(python: str, name: str, args, workdir: Path) -> dict:
    """Run one row in a fresh process; wall seconds from process start to saved model."""
    out = workdir / name
    cmd = [python, __file__, "--child", name, "--folder", args.folder,
           "--calib-file", str(workdir / "calib.safetensors"), "--child-out", str(out)]
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"row": name, "tool": ROWS[name][0], "settings": ROWS[name][1], "seconds": wall,
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
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
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

    args.folder = str(gguf_to_folder(builtin_gguf("smollm2-135m")))
    _, tokenizer = slimlm.load_model("smollm2-135m")
    calib = slimlm.calibration(tokenizer, "wikitext2", args.nsamples, args.seqlen, "first", data_dir=args.data_dir)
    _, test = protocol_windows(tokenizer, args.data_dir, 1, args.eval_windows)
    rows, load_start = [], load_average()
    with tempfile.TemporaryDirectory(prefix="llmc-gptq-") as tmp:
        workdir = Path(tmp)
        save_file({"input_ids": calib.contiguous()}, workdir / "calib.safetensors")
        for name in args.rows.split(","):  # compress all first, back to back, so timings share conditions
            python = args.llmc_python if ROWS[name][0] == "llmc" else sys.executable
            rows.append(timed_child(python, name, args, workdir))
            print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            row.update(evaluate_row(row, args.folder, test))
            print(json.dumps({k: row[k] for k in ("row", "perplexity", "max_distinct_per_group")}), flush=True)
    versions = {r["tool"]: r.pop("versions") for r in rows}
    meta = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_windows": args.eval_windows,
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
