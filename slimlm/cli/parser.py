"""The ``slimlm`` argument parser: one subcommand per pipeline stage.

The settings of each pipeline step (``STEP_SETTINGS``) are also the schema of a recipe: a recipe step's keys are
that step's flag names without ``--``, validated by a parser built from the same function (``slimlm.recipe``).
"""
from __future__ import annotations

import argparse
import re


def add_load_settings(p):
    """How the model is loaded and where its blocks compute: the run-level settings of a recipe."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1); the model "
                   "stays on the CPU and each block visits the device in turn")
    p.add_argument("--data-dir", help="offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                   "default: $SLIMLM_DATA_DIR, else the datasets library")


def _add_model_args(p):
    p.add_argument("model", help="built-in alias (smollm2-135m), HF folder, .gguf file, or hub id")
    add_load_settings(p)
    _add_display_args(p)


def _add_display_args(p):
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_eval_settings(p):
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="limit to the first N windows")


def _add_calib_args(p, nsamples=128, seqlen=2048):
    p.add_argument("--calib", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=seqlen)
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration windows per forward (default 2048 tokens)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (x layer mean)")


def _add_allocation_args(p):
    p.add_argument("--allocation", default="uniform", help="uniform, owl, alphapruning, errortable, fisher (ours)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: budgets span target +- lambda")
    p.add_argument("--alpha-epsilon", type=float, default=0.2, help="AlphaPruning: ratios span 1 +- epsilon")


def _override(value_type):
    """argparse type of ``--override REGEX=VALUE``: (regex, value); the regex must compile."""
    def parse(text: str):
        regex, sep, value = text.rpartition("=")
        if not sep or not regex:
            raise argparse.ArgumentTypeError(f"expected REGEX=VALUE, got '{text}'")
        try:
            re.compile(regex)
        except re.error as e:
            raise argparse.ArgumentTypeError(f"bad regular expression '{regex}': {e}") from None
        try:
            return regex, value_type(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {value_type.__name__} value '{value}' in '{text}'") from None
    return parse


def _add_override_arg(p, unit: str, value_type):
    p.add_argument("--override", action="append", type=_override(value_type), metavar="REGEX=VALUE",
                   help=f"per-layer {unit} for the linears whose name matches REGEX (re.search), applied after the "
                   "allocation or budgets map; repeatable, the first matching REGEX wins")


def _add_grid_args(p):
    p.add_argument("--group-size", type=int, default=128, help="quantization group (-1: per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--scale-dtype", choices=["float16"], help="round scales to float16 (exact GGUF Q4_0/Q4_1/Q8_0 "
                   "export; default float32)")


def add_prune_settings(p):
    p.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt, ria")
    p.add_argument("--sparsity", type=float, help="fraction of zeros per layer, in [0, 1) (default 0.5; not with "
                   "an N:M pattern, which fixes it)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (keep N of every M)")
    p.add_argument("--group", choices=["row", "matrix"], help="comparison group (default: the paper's)")
    p.add_argument("--permute", action="store_true", help="channel permutation before N:M (RIA)")
    p.add_argument("--ria-alpha", type=float, default=0.5, help="RIA activation exponent")
    _add_calib_args(p)
    _add_allocation_args(p)
    p.add_argument("--budgets", help="JSON file FQN -> sparsity (from `slimlm allocate --out`)")
    _add_override_arg(p, "sparsity", float)
    p.add_argument("--wbits", type=int, help="also quantize the kept weights (joint sparse + quantized)")
    _add_grid_args(p)


def add_quantize_settings(p):
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    p.add_argument("--wbits", type=int, default=4)
    _add_grid_args(p)
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ: calibrate every block on the dense model's activations (one pass, ~half the time)")
    p.add_argument("--abits", type=int, help="simulated per-token activation quantization (e.g. 4 for W4A4)")
    p.add_argument("--act-clip", type=float, default=1.0, help="activation clipping ratio")
    p.add_argument("--rotate", default="none", choices=["none", "hadamard"], help="QuaRot rotation first")
    p.add_argument("--avg-bits", type=float, help="mixed precision: per-layer bits with this weighted mean")
    _add_calib_args(p)
    _add_allocation_args(p)
    _add_override_arg(p, "bit-width", int)


def add_analyze_settings(p):
    _add_calib_args(p, nsamples=32, seqlen=512)
    p.add_argument("--no-calib", action="store_true", help="weight metrics only (no calibration pass)")
    p.add_argument("--no-fisher", action="store_true", help="skip the gradient pass behind --allocation fisher")
    p.add_argument("--fisher-for", choices=("wanda", "sparsegpt"), default="wanda",
                   help="price the fisher tables for this method's changes (sparsegpt: slower, ~1 min per level)")
    p.add_argument("--esd-layer", help="FQN of the layer whose ESD is plotted (default: the first)")
    p.add_argument("--target", default="sparsity=0.7", help="budget plotted for each allocator")


def add_rotate_settings(p):
    p.add_argument("--seed", type=int, default=0, help="seed of QuaRot's randomized Hadamard rotations")
    p.add_argument("--no-online-down", action="store_true", help="leave down_proj's input unrotated: no Hadamard "
                   "hook at inference, so the run exports to GGUF and compressed-tensors (weights are rotated "
                   "offline only; activation outliers before down_proj stay)")


def add_export_settings(p):
    p.add_argument("--format", required=True, choices=["compressed-tensors", "sparse", "gguf"])
    p.add_argument("--out", required=True, help="output folder, or for gguf a .gguf file (never overwritten)")
    p.add_argument("--inexact", action="store_true", help="compressed-tensors: allow scales within an ulp "
                   "(bf16/fp16 runs); gguf: round block scales to float16 and report the deviation")
    p.add_argument("--gguf-type", default="auto", help="gguf: auto (the run's grid where a block type holds it "
                   "exactly, else the run's float dtype), f32, f16, bf16, q8_0, q4_0, q4_1")


# recipe step kind -> the function adding its settings (the CLI subcommands use the same functions)
STEP_SETTINGS = {"analyze": add_analyze_settings, "rotate": add_rotate_settings, "prune": add_prune_settings,
                 "quantize": add_quantize_settings, "eval": add_eval_settings, "export": add_export_settings}


def _add_run_args(p):
    p.add_argument("--offload", choices=["disk"], help="disk: keep the model on disk and stream one block at a "
                   "time from its safetensors shards into the output shards (memory about one block, any size)")
    p.add_argument("--resume", action="store_true", help="checkpoint every block in .OUT.partial beside --out "
                   "(always done with --offload disk) and continue an interrupted run from its last finished "
                   "block (same weights as an uninterrupted run)")


def build_parser() -> argparse.ArgumentParser:
    """Each subcommand's ``command`` names its function in ``slimlm.cli.commands`` (``cmd_<command>``)."""
    parser = argparse.ArgumentParser(prog="slimlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for command, text, doing in (("prune", "prune a model block by block on calibration data", "pruning"),
                                 ("quantize", "quantize weights (RTN, GPTQ), optionally rotated and W4A4",
                                  "quantizing")):
        p = sub.add_parser(command, help=text)
        _add_model_args(p)
        STEP_SETTINGS[command](p)
        p.add_argument("--out", help="output folder (default runs/<model>-<method>-<budget>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        _add_run_args(p)
        p.add_argument("--eval", action="store_true", help=f"measure test perplexity after {doing}")
        add_eval_settings(p)

    p = sub.add_parser("analyze", help="per-layer weight spectra and activation metrics, with plots")
    _add_model_args(p)
    add_analyze_settings(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("run", help="replay a recipe (recipe.yaml of any run, or one of recipes/)")
    p.add_argument("recipe", help="YAML file: model, settings and steps (see README, Recipes)")
    p.add_argument("--out", help="run folder instead of the recipe's out (exports under it move along)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (never an export)")
    _add_run_args(p)
    _add_display_args(p)

    p = sub.add_parser("allocate", help="per-layer budget map from an analysis folder")
    p.add_argument("analysis", help="folder written by `slimlm analyze`")
    p.add_argument("--target", default="sparsity=0.7", help="sparsity=0.7, bits=3.5 or rank=0.5")
    _add_allocation_args(p)
    p.add_argument("--out", help="write the budget map to this JSON file (and a PNG beside it)")
    p.set_defaults(quiet=True)

    p = sub.add_parser("export", help="write a saved run in an engine's format")
    p.add_argument("run", help="folder written by `slimlm prune` or `slimlm quantize`")
    add_export_settings(p)
    p.set_defaults(quiet=True)

    p = sub.add_parser("eval", help="perplexity and/or zero-shot accuracy of a saved run or any model")
    _add_model_args(p)
    add_eval_settings(p)
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names (piqa,arc_easy,hellaswag): "
                   "zero-shot accuracy instead of perplexity; needs pip install 'slimlm[eval]'")
    p.add_argument("--ppl", action="store_true", help="with --tasks: measure perplexity as well")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N documents of each task")
    p.add_argument("--tasks-dir", help="zero-shot: folder of extra task YAMLs (their data_files paths are "
                   "resolved from the current directory)")
    p.add_argument("--num-fewshot", type=int, default=0, help="zero-shot: examples in each prompt")
    p.add_argument("--batch-size", type=int, default=1, help="zero-shot: requests per forward")

    p = sub.add_parser("report", help="one HTML + markdown page (tables, curves, plots) of every run found")
    p.add_argument("folders", nargs="+", help="folders searched for runs (slimlm.json) and analyses")
    p.add_argument("--out", help="output folder (default <first folder>/report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(quiet=True)
    return parser
