"""The ``slimlm`` argument parser: one subcommand per pipeline stage.

A pipeline step's flags come from its typed config (``cli.settings``, ``slimlm.config``), whose rules refuse an
option that would change nothing; the options of a command alone (``--eval``, ``--engine``, ...) are refused
the same way here (``ONLY_WITH``). Every subcommand's --help shows its defaults.
"""
from __future__ import annotations

import argparse

from slimlm.cli.cache import add_cache_parser
from slimlm.cli.settings import (add_allocation_settings, add_calib_settings, add_eval_settings, add_load_settings,
                                 add_step_settings)
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
# Command options that take effect only together with another choice: (commands, options, in effect?, what they
# need). One set away from its default where it would change nothing is refused rather than silently ignored (a
# step's own settings follow its config's rules instead).
ONLY_WITH = [
    (("prune", "quantize", "shrink", "lowrank"), EVAL_OPTIONS, lambda a: a.eval, "--eval"),
    (("eval",), EVAL_OPTIONS, lambda a: not a.tasks or a.ppl, "perplexity (no --tasks, or --tasks with --ppl)"),
    (("eval",), ("--ppl", "--limit", "--tasks-dir", "--num-fewshot"), lambda a: a.tasks, "--tasks"),
    (("prune", "quantize", "analyze", "eval", "shrink", "lowrank", "speed", "sweep"), ("--no-cache",),
     lambda a: a.model.endswith(".gguf") or _builtin(a.model), "a .gguf model or the built-in one"),
    (("gguf",), ("--device",), lambda a: False, "prune, quantize or analyze (slimlm gguf computes on the CPU)"),
    (("eval",), ("--kld-reference", "--threads"), lambda a: a.engine == "llama.cpp", "--engine llama.cpp"),
    (("eval",), ("--tasks", "--batch-size", "--record", "--dtype", "--device", "--no-cache", "--allow-pickle"),
     lambda a: a.engine == "transformers", "--engine transformers"),
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


def _add_run_args(p):
    p.add_argument("--offload", choices=["disk"], help="disk: keep the model on disk and stream one block at a "
                   "time from its safetensors shards into the output shards (memory about one block, any size)")
    p.add_argument("--resume", action="store_true", help="checkpoint every block in .OUT.partial beside --out "
                   "(always done with --offload disk) and continue an interrupted run from its last finished "
                   "block (same weights as an uninterrupted run)")
    p.add_argument("--device-map", metavar="auto|DEVICES", help="spread each block, while it is calibrated and "
                   "compressed, over several GPUs (auto: all visible; or cuda:0,cuda:1); the rest of the model stays "
                   "on the CPU or disk")


def _add_compress_command(sub, name: str, help_text: str, out_help: str) -> None:
    p = sub.add_parser(name, help=help_text)
    _add_model_args(p)
    add_step_settings(p, name)
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
    _add_compress_command(sub, "prune", "prune a model block by block on calibration data",
                          "output folder (default runs/<model>-<method>-<budget>)")
    _add_compress_command(sub, "quantize", "quantize weights (RTN, GPTQ), optionally rotated and W4A4",
                          "output folder (default runs/<model>-<method>-w<bits>)")
    _add_compress_command(sub, "shrink", "a smaller dense model: remove decoder layers, or attention heads and "
                          "MLP channels", "output folder (default runs/<model>-drop<N>-<score> or "
                          "runs/<model>-<method>-<allocation>-p<params>)")
    _add_compress_command(sub, "lowrank", "factor the decoder layers' linears into two smaller ones (SVD-LLM, "
                          "WeLore)", "output folder (default runs/<model>-<method>-<allocation>-p<params>)")

    p = sub.add_parser("speed", help="measured prefill and decode tokens/s, time to first token and peak memory, "
                       "beside the dense model measured in the same invocation")
    p.add_argument("model", help="run folder, HF folder, built-in alias, or .gguf file (llama.cpp)")
    p.add_argument("--baseline", help="the model to compare with (default: a run folder's source model; "
                   "required for a .gguf file)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"],
                   help="transformers (slimlm.load_model, greedy decoding with a KV cache) or llama.cpp "
                   "(llama-bench, llama-batched-bench)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the prefill")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded after the prompt")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes of the decode")
    p.add_argument("--repeats", type=int, default=3, help="rounds, models alternating; medians reported")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="transformers: dtype of the weights")
    p.add_argument("--device", default="cpu", help="transformers: cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the whole result as one JSON line instead of "
                   "the table")
    _add_display_args(p)

    p = sub.add_parser("analyze", help="per-layer weight spectra and activation metrics, with plots")
    _add_model_args(p)
    add_step_settings(p, "analyze")
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
    add_allocation_settings(p)
    p.add_argument("--out", help="write the budget map to this JSON file (and a PNG beside it)")
    p.add_argument("--json", action="store_true", help="print the map as one JSON line instead of the table")
    p.set_defaults(quiet=True)

    p = sub.add_parser("export", help="write a saved run in an engine's format")
    p.add_argument("run", help="folder written by slimlm prune or slimlm quantize")
    add_step_settings(p, "export", skip=())
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
    add_step_settings(p, "gguf", skip=())
    p.add_argument("--overwrite", action="store_true", help="replace an existing .gguf file (atomically: the old "
                   "file stays until the new one is whole)")

    p = sub.add_parser("sweep", help="a grid of prune runs (methods x sparsities x allocations x seeds), every "
                       "cell a Ray task; finished cells are skipped on rerun; one JSON and the perplexity plot")
    _add_model_args(p)
    p.add_argument("--methods", required=True, help="comma-separated pruning methods, e.g. wanda,sparsegpt")
    p.add_argument("--sparsities", required=True, help="comma-separated sparsity targets, e.g. 0.5,0.6,0.7")
    p.add_argument("--allocations", default="uniform", help="comma-separated allocators, e.g. uniform,owl,fisher")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (calibration windows)")
    add_calib_settings(p, skip=("seed",))  # --seeds instead
    add_eval_settings(p)
    p.add_argument("--ray", metavar="auto|ADDRESS", help="the Ray cluster to run on: auto (the running one), "
                   "HOST:PORT or ray://HOST:PORT (default: a local Ray started for the sweep)")
    p.add_argument("--cpus-per-cell", type=float, default=1, help="CPUs Ray reserves for each cell")
    p.add_argument("--gpus-per-cell", type=float, default=0, help="GPUs Ray reserves for each cell (with "
                   "--device cuda)")
    p.add_argument("--out", default="runs/sweep", help="folder of the cells' run folders, sweep.json and "
                   "sweep.png")

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
