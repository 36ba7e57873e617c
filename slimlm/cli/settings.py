"""The settings of each pipeline step: one function per step kind adds its flags to a parser.

``STEP_SETTINGS`` is also the schema of a recipe: a recipe step's keys are that step's flag names without ``--``,
validated by a parser built from the same function (``slimlm.recipe``); the subcommands of ``cli.parser`` add
the same functions' flags.
"""
from __future__ import annotations

import argparse
import re


def add_load_settings(p):
    """How the model is loaded and where its blocks compute: the run-level settings of a recipe."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights while computing and in the saved run")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1); the model "
                   "stays on the CPU and each block visits the device in turn")
    p.add_argument("--data-dir", help="offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                   "default: $SLIMLM_DATA_DIR, else the datasets library")


def add_eval_settings(p):
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--eval-seqlen", type=int, default=2048, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, metavar="N", help="evaluate the first N windows only (default: "
                   "every window of the test text, as the protocol asks: 147 windows of 2048 tokens for "
                   "WikiText-2 with the built-in model, minutes to hours on a CPU)")


def add_calib_args(p, nsamples=128, seqlen=2048, seed=True):
    p.add_argument("--calib", default="wikitext2", help="calibration text: wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=nsamples, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=seqlen, help="tokens per calibration window")
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"],
                   help="random: windows at seeded random offsets; first: the first non-overlapping windows")
    if seed:  # (slimlm sweep has --seeds instead)
        p.add_argument("--seed", type=int, default=0, help="random seed (calibration windows; quantize: also the "
                       "Hadamard rotation)")
    p.add_argument("--batch-size", type=int, help="calibration windows per forward (default: as many as "
                   "make 2048 tokens)")
    p.add_argument("--owl-m", type=float, default=5.0, metavar="M", help="OWL outlier threshold: a weight is an "
                   "outlier when its Wanda score exceeds M times its layer's mean")


def add_allocation_args(p):
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
    add_calib_args(p)
    add_allocation_args(p)
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
    p.add_argument("--act-clip", type=float, help="with --abits: activation clipping ratio (default: the "
                   "transform's, DuQuant 0.9; otherwise 1, no clipping)")
    p.add_argument("--act-grid", choices=["sym", "asym"], help="with --abits: symmetric or asymmetric per-token "
                   "grid (default: the transform's, DuQuant asym; otherwise sym as QuaRot)")
    p.add_argument("--kvbits", type=int, help="simulated KV-cache quantization after RoPE, per head and token, "
                   "asymmetric (e.g. 4 for W4A4KV4)")
    p.add_argument("--kv-clip", type=float, default=1.0, help="with --kvbits: KV clipping ratio (1: none)")
    p.add_argument("--rotate", default="none", choices=["none", "hadamard"],
                   help="hadamard: QuaRot's rotation before quantizing")
    p.add_argument("--transform", default="none", choices=["none", "smoothquant", "duquant", "flatquant"],
                   help="outlier-aware transform of each linear's input, calibrated block by block: smoothquant "
                   "(per-channel scales folded into the norms), duquant (smoothing, block rotations, zigzag "
                   "permutation, second rotation; online) or flatquant (learned affine transforms and clipping, "
                   "trained per block against the full-precision block)")
    p.add_argument("--alpha", type=float, help="with --transform: smoothing exponent (default: SmoothQuant 0.5, "
                   "DuQuant 0.6; FlatQuant 0.3, its scales' starting point)")
    p.add_argument("--lwc", action="store_true", help="with --transform duquant: learn each weight row's clipping "
                   "range per block (DuQuant+LWC) instead of the fixed 0.8")
    p.add_argument("--epochs", type=int, help="training epochs per block of --transform flatquant (default 15, "
                   "the paper's) or of --lwc (default 20)")
    p.add_argument("--weight-clip", type=float, help="weight clipping ratio (default: the transform's, DuQuant "
                   "0.8; otherwise 1)")
    p.add_argument("--intact-kv", choices=["bos", "prefix"], help="IntactKV: start every sequence from the "
                   "full-precision model's KV cache of [BOS] (bos) or of [BOS] + --intact-prefix (prefix; the text "
                   "alone for tokenizers without BOS, e.g. Qwen's)")
    p.add_argument("--intact-prefix", help="with --intact-kv prefix: the fixed text (e.g. a system prompt)")
    p.add_argument("--calibrate-kv", action="store_true", help="with --intact-kv: tune the kept cache so that the "
                   "quantized model's layer outputs match the full-precision model's (IntactKV+Cal; 160 steps)")
    p.add_argument("--avg-bits", type=float, help="mixed precision: per-layer bits with this weighted mean")
    add_calib_args(p)
    add_allocation_args(p)
    _add_override_arg(p, "bit-width", int)


def add_analyze_settings(p):
    add_calib_args(p, nsamples=32, seqlen=512)
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
    p.add_argument("--method", default="flap", choices=["flap", "fisher", "slicegpt"], help="width: which heads "
                   "and channels go; flap: FLAP's fluctuation metric; fisher: estimated loss increase (slimlm's); "
                   "slicegpt: instead narrow the residual stream to its principal directions (SliceGPT; loads "
                   "through slimlm only, no GGUF)")
    p.add_argument("--allocation", default="auto", choices=["auto", "uniform", "owl", "alphapruning", "flap",
                                                            "fisher"],
                   help="width: how many units each layer loses; auto: the method's own (flap: FLAP's global "
                   "ranking of standardised scores; fisher: global ranking by loss per parameter; slicegpt: "
                   "uniform, its only one)")
    p.add_argument("--no-compensate", action="store_true", help="width: no FLAP bias compensation of the "
                   "removed channels' mean output")
    add_calib_args(p, nsamples=32, seqlen=512)


def add_lowrank_settings(p):
    p.add_argument("--params", type=float, required=True, metavar="FRACTION", help="fraction of the decoder "
                   "layers' linear parameters to keep")
    p.add_argument("--method", default="svdllm", choices=["svdllm", "welore"], help="svdllm: SVD of the weight "
                   "whitened by its calibration inputs (truncation-aware); welore: plain SVD of the weight")
    p.add_argument("--allocation", default="auto", choices=["auto", "uniform", "welore", "owl", "alphapruning",
                                                            "fisher"],
                   help="ranks per matrix; auto: the method's own (svdllm: uniform; welore: its global threshold "
                   "on normalised singular values); fisher: truncation loss priced in loss units (slimlm's)")
    p.add_argument("--merge", action="store_true", help="multiply the factors back into dense weights (the "
                   "truncation stays, the savings go: for engines that cannot hold factors, such as GGUF)")
    add_calib_args(p, nsamples=32, seqlen=512)


def add_gguf_settings(p):
    from slimlm.gguf.mixes import MIXES

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
    add_calib_args(p, nsamples=32, seqlen=512)


# recipe step kind -> the function adding its settings (the CLI subcommands use the same functions)
STEP_SETTINGS = {"analyze": add_analyze_settings, "rotate": add_rotate_settings, "prune": add_prune_settings,
                 "quantize": add_quantize_settings, "eval": add_eval_settings, "export": add_export_settings,
                 "gguf": add_gguf_settings, "shrink": add_shrink_settings, "lowrank": add_lowrank_settings}
