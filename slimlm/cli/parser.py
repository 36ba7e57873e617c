"""The ``slimlm`` argument parser: one subcommand per pipeline stage.

The settings of each pipeline step (``STEP_SETTINGS``) are also the schema of a recipe: a recipe step's keys are
that step's flag names without ``--``, validated by a parser built from the same function (``slimlm.recipe``).
Every subcommand's --help shows its defaults, and an option that would change nothing with the other options
given is refused (``ONLY_WITH``) rather than silently ignored.
"""
from __future__ import annotations

import argparse
import re

from slimlm.cli.cache import add_cache_parser
from slimlm.version import __version__

DESCRIPTION = ("Prune and quantize Hugging Face causal LMs block by block on calibration data, evaluate them and "
               "export them.")
EPILOG = "slimlm COMMAND --help lists a command's options and their defaults."


class HelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help, where it has one worth saying (not None or False) and the
    help does not already explain it."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        # "is False", not "in": a default of 0 is worth saying, an off switch is not
        unset = action.default in (None, argparse.SUPPRESS) or action.default is False
        if unset or not action.option_strings or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"


EVAL_OPTIONS = ("--eval-dataset", "--eval-seqlen", "--eval-windows")
CALIB_OPTIONS = ("--calib", "--nsamples", "--seqlen", "--calib-sampling", "--seed", "--batch-size", "--owl-m")

# Options that take effect only together with another choice: (commands, options, in effect?, what they need).
# One set away from its default where it would change nothing is refused rather than silently ignored.
ONLY_WITH = [
    (("prune", "quantize", "shrink"), EVAL_OPTIONS, lambda a: a.eval, "--eval"),
    (("shrink",), ("--score", "--iterative"), lambda a: a.drop_layers is not None, "--drop-layers"),
    (("shrink",), ("--method", "--allocation", "--no-compensate"), lambda a: a.params is not None, "--params"),
    (("shrink",), ("--owl-m",), lambda a: a.allocation == "owl", "--allocation owl"),
    (("eval",), EVAL_OPTIONS, lambda a: not a.tasks or a.ppl, "perplexity (no --tasks, or --tasks with --ppl)"),
    (("eval",), ("--ppl", "--limit", "--tasks-dir", "--num-fewshot"), lambda a: a.tasks, "--tasks"),
    (("prune",), ("--ria-alpha",), lambda a: a.method == "ria", "--method ria"),
    (("prune",), ("--permute",), lambda a: a.pattern != "unstructured" and a.method != "sparsegpt",
     "an N:M --pattern and --method magnitude, wanda or ria"),
    (("prune",), ("--group",), lambda a: a.pattern == "unstructured", "--pattern unstructured"),
    (("prune",), ("--group-size", "--asym", "--scale-dtype"), lambda a: a.wbits is not None, "--wbits"),
    (("prune",), ("--owl-m",), lambda a: a.allocation == "owl", "--allocation owl"),
    (("quantize",), ("--owl-m",), lambda a: False, "prune or analyze (quantize's owl allocation keeps M at 5)"),
    (("prune", "quantize", "allocate"), ("--owl-lambda",), lambda a: a.allocation == "owl", "--allocation owl"),
    (("prune", "quantize", "allocate"), ("--alpha-epsilon",), lambda a: a.allocation == "alphapruning",
     "--allocation alphapruning"),
    (("quantize",), ("--act-order", "--one-pass"), lambda a: a.method == "gptq", "--method gptq"),
    (("quantize",), ("--act-clip",), lambda a: a.abits is not None, "--abits"),
    (("analyze",), CALIB_OPTIONS, lambda a: not a.no_calib, "a calibration pass (not with --no-calib)"),
    (("analyze",), ("--fisher-for",), lambda a: not (a.no_calib or a.no_fisher),
     "the fisher tables (not with --no-calib or --no-fisher)"),
    (("prune", "quantize", "analyze", "eval", "shrink"), ("--no-cache",),
     lambda a: a.model.endswith(".gguf") or _builtin(a.model), "a .gguf model or the built-in one"),
    (("gguf",), ("--owl-m",), lambda a: False, "prune or analyze"),
    (("gguf",), ("--device",), lambda a: False, "prune, quantize or analyze (slimlm gguf computes on the CPU)"),
    (("gguf",), ("--batch-size",), lambda a: a.method == "gptq" or a.imatrix, "--method gptq or --imatrix"),
    (("gguf",), ("--imatrix",), lambda a: a.method == "rtn", "--method rtn"),
    (("gguf",), ("--act-order",), lambda a: a.method == "gptq", "--method gptq"),
    (("gguf",), CALIB_OPTIONS, lambda a: a.method == "gptq" or a.imatrix or a.size, "--method gptq, --imatrix "
     "or --size"),
    (("eval",), ("--kld-reference", "--threads"), lambda a: a.engine == "llama.cpp", "--engine llama.cpp"),
    (("eval",), ("--tasks", "--batch-size", "--record", "--dtype", "--device", "--no-cache", "--allow-pickle"),
     lambda a: a.engine == "transformers", "--engine transformers"),
    (("export",), ("--gguf-type",), lambda a: a.format == "gguf", "--format gguf"),
    (("export",), ("--inexact",), lambda a: a.format != "sparse", "--format compressed-tensors or gguf"),
]


def _builtin(name: str) -> bool:
    from slimlm.core.models import BUILTIN_MODELS  # here, so that building the parser imports no torch

    return name in BUILTIN_MODELS


def ineffective_option(command: str, namespace: argparse.Namespace, default) -> str | None:
    """The first option of ``namespace`` (a ``command``'s settings) set away from its ``default(dest)`` where the
    other settings make it do nothing, as "--opt only applies with ...", or None. Rules that read a setting the
    namespace lacks (a recipe step holds only its own settings) are skipped."""
    for commands, options, in_effect, needs in ONLY_WITH:
        try:
            if command not in commands or in_effect(namespace):
                continue
        except AttributeError:
            continue
        for option in options:
            dest = option[2:].replace("-", "_")
            if hasattr(namespace, dest) and getattr(namespace, dest) != default(dest):
                return f"{option} only applies with {needs}"
    return None


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: its --help shows the defaults, and it refuses options that would have no effect."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        command = self.prog.rpartition(" ")[2]  # add_parser names it "slimlm <command>"
        problem = ineffective_option(command, namespace, self.get_default)
        if problem:
            self.exit(2, f"slimlm: error: {problem}\n")
        return namespace, extras


def add_load_settings(p):
    """How the model is loaded and where its blocks compute: the run-level settings of a recipe."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights while computing and in the saved run")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1); the model "
                   "stays on the CPU and each block visits the device in turn")
    p.add_argument("--data-dir", help="offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                   "default: $SLIMLM_DATA_DIR, else the datasets library")


def _add_model_args(p):
    p.add_argument("model", help="built-in alias (smollm2-135m), HF folder, .gguf file, or hub id")
    add_load_settings(p)
    _add_display_args(p)


def _add_display_args(p):
    """Options that change how a run goes, never what it computes (not part of a recipe)."""
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    p.add_argument("--no-cache", action="store_true", help="a .gguf model (or the built-in one) is dequantized in "
                   "memory (~30 s each time) instead of being kept as a float32 copy in $SLIMLM_CACHE")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")


def add_eval_settings(p):
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, metavar="N", help="evaluate the first N windows only (default: "
                   "every window of the test text, as the protocol asks: 147 windows of 2048 tokens for "
                   "WikiText-2 with the built-in model, minutes to hours on a CPU)")


def _add_calib_args(p, nsamples=128, seqlen=2048):
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration window")
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"],
                   help="random: windows at seeded random offsets; first: the first non-overlapping windows")
    p.add_argument("--seed", type=int, default=0, help="random seed (calibration windows; quantize: also the "
                   "Hadamard rotation)")
    p.add_argument("--batch-size", type=int, help="calibration windows per forward (default: as many as "
                   "make 2048 tokens)")
    p.add_argument("--owl-m", type=float, default=5.0, metavar="M", help="OWL outlier threshold: a weight is an "
                   "outlier when its Wanda score exceeds M times its layer's mean")


def _add_allocation_args(p):
    p.add_argument("--allocation", default="uniform", help="how the target is spread over the layers: uniform, "
                   "owl, alphapruning, errortable, or fisher (slimlm's own)")
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
    p.add_argument("--group-size", type=int, default=128, help="weights per quantization scale along a row "
                   "(-1: one scale per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--scale-dtype", choices=["float16"], help="round scales to float16 (exact GGUF Q4_0/Q4_1/Q8_0 "
                   "export; default float32)")


def add_prune_settings(p):
    p.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt, ria")
    p.add_argument("--sparsity", type=float, help="fraction of zeros per layer, in [0, 1) (default 0.5; not with "
                   "an N:M pattern, which fixes it)")
    p.add_argument("--pattern", default="unstructured", help="unstructured, or N:M to keep N of every M "
                   "consecutive input weights, e.g. 2:4")
    p.add_argument("--group", choices=["row", "matrix"], help="comparison group (default: the paper's)")
    p.add_argument("--permute", action="store_true", help="channel permutation before N:M (RIA)")
    p.add_argument("--ria-alpha", type=float, default=0.5, help="RIA: exponent of the input-channel norms")
    _add_calib_args(p)
    _add_allocation_args(p)
    p.add_argument("--budgets", help="JSON file FQN -> sparsity, as written by slimlm allocate --out")
    _add_override_arg(p, "sparsity", float)
    p.add_argument("--wbits", type=int, help="also quantize the kept weights to this many bits "
                   "(joint sparse + quantized)")
    _add_grid_args(p)


def add_quantize_settings(p):
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"],
                   help="rtn: round to nearest (no data); gptq: error-correcting, on calibration data")
    p.add_argument("--wbits", type=int, default=4, help="bits per weight, 2 to 8")
    _add_grid_args(p)
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ: calibrate every block on the dense model's activations (one pass, ~half the time)")
    p.add_argument("--abits", type=int, help="simulated per-token activation quantization (e.g. 4 for W4A4)")
    p.add_argument("--act-clip", type=float, default=1.0, help="with --abits: activation clipping ratio "
                   "(1: no clipping)")
    p.add_argument("--rotate", default="none", choices=["none", "hadamard"],
                   help="hadamard: QuaRot's rotation before quantizing")
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
    p.add_argument("--target", default="sparsity=0.7", help="global budget whose per-layer maps are plotted: "
                   "sparsity=0.7, bits=3.5 or rank=0.5")


def add_rotate_settings(p):
    p.add_argument("--seed", type=int, default=0, help="seed of QuaRot's randomized Hadamard rotations")
    p.add_argument("--no-online-down", action="store_true", help="leave down_proj's input unrotated: no Hadamard "
                   "hook at inference, so the run exports to GGUF and compressed-tensors (weights are rotated "
                   "offline only; activation outliers before down_proj stay)")


def add_export_settings(p):
    p.add_argument("--format", required=True, choices=["compressed-tensors", "sparse", "gguf"],
                   help="compressed-tensors (vLLM), sparse (slimlm's masks and kept values), gguf (llama.cpp)")
    p.add_argument("--out", required=True, help="output folder, or for gguf a .gguf file (never overwritten)")
    p.add_argument("--inexact", action="store_true", help="compressed-tensors: allow scales within an ulp "
                   "(bf16/fp16 runs); gguf: round block scales to float16 and report the deviation")
    p.add_argument("--gguf-type", default="auto", help="gguf: auto (the run's grid where a block type holds it "
                   "exactly, else the run's float dtype), f32, f16, bf16, q8_0, q4_0, q4_1")


def add_shrink_settings(p):
    p.add_argument("--drop-layers", type=int, metavar="N", help="depth: remove N whole decoder layers")
    p.add_argument("--score", default="influence", choices=["influence", "loss"], help="depth: which layers go "
                   "first; influence: ShortGPT's 1 - cos(input, output); loss: the measured calibration-loss "
                   "increase when the layer alone is skipped (slimlm's)")
    p.add_argument("--iterative", action="store_true", help="depth: remove one layer at a time, scoring the "
                   "smaller model again each time")
    p.add_argument("--params", type=float, metavar="FRACTION", help="width: fraction of the decoder layers' "
                   "parameters to keep (attention head groups and MLP channels are removed)")
    p.add_argument("--method", default="flap", choices=["flap", "fisher"], help="width: which heads and "
                   "channels go; flap: FLAP's fluctuation metric; fisher: estimated loss increase (slimlm's)")
    p.add_argument("--allocation", default="auto", choices=["auto", "uniform", "owl", "alphapruning", "flap",
                                                            "fisher"],
                   help="width: how many units each layer loses; auto: the method's own (flap: FLAP's global "
                   "ranking of standardised scores; fisher: global ranking by loss per parameter)")
    p.add_argument("--no-compensate", action="store_true", help="width: no FLAP bias compensation of the "
                   "removed channels' mean output")
    _add_calib_args(p, nsamples=32, seqlen=512)


# recipe step kind -> the function adding its settings (the CLI subcommands use the same functions)
def add_gguf_settings(p):
    from slimlm.quant.gguf_mixes import MIXES

    p.add_argument("--type", default="Q4_K_M", type=str.upper, choices=list(MIXES), help="llama.cpp file type: "
                   "its per-tensor types are the ones llama-quantize picks for it")
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"], help="rtn: the format's weighted scale "
                   "search and rounding; gptq: GPTQ onto the stored grid, on calibration data")
    p.add_argument("--imatrix", action="store_true", help="rtn: weigh the scale search by each input's mean "
                   "squared activation on calibration data (llama-imatrix's importance)")
    p.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing Hessian diagonal "
                   "inside each block")
    p.add_argument("--size", help="our own per-tensor types fitted to this size instead of the mix's rule for "
                   "the decoder blocks: bits per weight over all tensors (3.5bpw) or tensor bytes (70MB); "
                   "costs from measured Fisher information on the calibration data")
    _add_calib_args(p, nsamples=32, seqlen=512)


STEP_SETTINGS = {"analyze": add_analyze_settings, "rotate": add_rotate_settings, "prune": add_prune_settings,
                 "quantize": add_quantize_settings, "eval": add_eval_settings, "export": add_export_settings,
                 "gguf": add_gguf_settings, "shrink": add_shrink_settings}


def _add_run_args(p):
    p.add_argument("--offload", choices=["disk"], help="disk: keep the model on disk and stream one block at a "
                   "time from its safetensors shards into the output shards (memory about one block, any size)")
    p.add_argument("--resume", action="store_true", help="checkpoint every block in .OUT.partial beside --out "
                   "(always done with --offload disk) and continue an interrupted run from its last finished "
                   "block (same weights as an uninterrupted run)")


def _add_compress_command(sub, name: str, help_text: str, settings, out_help: str) -> None:
    p = sub.add_parser(name, help=help_text)
    _add_model_args(p)
    settings(p)
    p.add_argument("--out", help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_run_args(p)
    p.add_argument("--eval", action="store_true", help="measure test perplexity afterwards")
    add_eval_settings(p)


def build_parser() -> argparse.ArgumentParser:
    """Each subcommand's ``command`` names its function in ``slimlm.cli.commands`` (``cmd_<command>``)."""
    parser = argparse.ArgumentParser(prog="slimlm", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    _add_compress_command(sub, "prune", "prune a model block by block on calibration data", add_prune_settings,
                          "output folder (default runs/<model>-<method>-<budget>)")
    _add_compress_command(sub, "quantize", "quantize weights (RTN, GPTQ), optionally rotated and W4A4",
                          add_quantize_settings, "output folder (default runs/<model>-<method>-w<bits>)")

    _add_compress_command(sub, "shrink", "a smaller dense model: remove decoder layers, or attention heads and "
                          "MLP channels", add_shrink_settings, "output folder (default "
                          "runs/<model>-drop<N>-<score> or runs/<model>-<method>-<allocation>-p<params>)")

    p = sub.add_parser("analyze", help="per-layer weight spectra and activation metrics, with plots")
    _add_model_args(p)
    add_analyze_settings(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    p = sub.add_parser("run", help="replay a recipe (the recipe.yaml of any run, or one of recipes/)")
    p.add_argument("recipe", help="YAML file: model, settings and steps (see README, Recipes)")
    p.add_argument("--out", help="run folder instead of the recipe's out (exports under it move along)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder (never an export)")
    _add_run_args(p)
    _add_display_args(p)

    p = sub.add_parser("allocate", help="per-layer budget map from an analysis folder")
    p.add_argument("analysis", help="folder written by slimlm analyze")
    p.add_argument("--target", default="sparsity=0.7", help="global budget: sparsity=0.7, bits=3.5 or "
                   "rank=0.5 (the parameter-weighted mean of the map)")
    _add_allocation_args(p)
    p.add_argument("--out", help="write the budget map to this JSON file (and a PNG beside it)")
    p.add_argument("--json", action="store_true", help="print the map as one JSON line instead of the table")
    p.set_defaults(quiet=True)

    p = sub.add_parser("export", help="write a saved run in an engine's format")
    p.add_argument("run", help="folder written by slimlm prune or slimlm quantize")
    add_export_settings(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("eval", help="perplexity and/or zero-shot accuracy of a saved run or any model")
    _add_model_args(p)
    add_eval_settings(p)
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names (piqa,arc_easy,hellaswag): "
                   "zero-shot accuracy instead of perplexity; needs pip install 'slimlm[eval]'")
    p.add_argument("--ppl", action="store_true", help="with --tasks: measure perplexity as well")
    p.add_argument("--limit", type=int, metavar="N", help="zero-shot: only the first N documents of each task")
    p.add_argument("--tasks-dir", help="zero-shot: folder of extra task YAMLs (their data_files paths are "
                   "resolved from the current directory)")
    p.add_argument("--num-fewshot", type=int, default=0, help="zero-shot: examples in each prompt")
    p.add_argument("--batch-size", type=int, default=1, help="windows (perplexity) or requests (zero-shot) "
                   "per forward")
    p.add_argument("--record", action="store_true", help="write the results into the run folder's slimlm.json "
                   "(under metrics, atomically); without it the run folder is never modified")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"],
                   help="who computes the perplexity: transformers (our protocol: every token of each window) "
                   "or llama.cpp's llama-perplexity on a .gguf file (second half of each --eval-seqlen chunk; "
                   "tools from scripts/build_llama_cpp.sh)")
    p.add_argument("--kld-reference", metavar="GGUF", help="llama.cpp: also the mean KL divergence from this "
                   "reference file's token distributions (e.g. the F16 file)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp: CPU threads")

    p = sub.add_parser("gguf", help="quantize any model onto llama.cpp's weight types and write one GGUF file")
    _add_model_args(p)
    add_gguf_settings(p)
    p.add_argument("--out", required=True, help="new .gguf file (or new folder) to write")

    p = sub.add_parser("report", help="one HTML + markdown page (tables, curves, plots) of every run found")
    p.add_argument("folders", nargs="+", help="folders searched for runs (slimlm.json) and analyses")
    p.add_argument("--out", help="output folder (default <first folder>/report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(quiet=True)
    add_cache_parser(sub)
    _describe_commands(sub)
    return parser


def _describe_commands(sub) -> None:
    """Each command's line in the command list also heads its own --help."""
    for choice in sub._choices_actions:  # argparse keeps the add_parser(help=...) lines only here
        command = sub.choices[choice.dest]
        command.description = command.description or choice.help
