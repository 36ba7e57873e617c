"""The configs of the steps that calibrate and compress weights: prune and quantize, and the calibration and
allocation settings they share with the other calibrated steps."""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Literal

from slimlm.config.schema import Config, Rule, SettingError, check_name, never, option
from slimlm.errors import SlimlmError, closest, read_json

CALIBRATION = ("calib", "nsamples", "seqlen", "calib_sampling", "seed", "batch_size", "owl_m")  # CalibrationConfig's fields


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig(Config):
    """The calibration windows; defaults are the GPTQ/SparseGPT/Wanda protocol (128 windows of 2048 tokens)."""

    calib: str = option("wikitext2", "calibration text: wikitext2, c4, or a text file")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    calib_sampling: Literal["random", "first"] = option(
        "random", "random: windows at seeded random offsets; first: the first non-overlapping windows")
    seed: int = option(0, "random seed (calibration windows; quantize: also the Hadamard rotation)")
    batch_size: int | None = option(None, "calibration windows per forward (default: as many as make 2048 tokens)")
    owl_m: float = option(5.0, "OWL outlier threshold: a weight is an outlier when its Wanda score exceeds M times "
                          "its layer's mean", metavar="M")

    def check(self) -> None:
        from slimlm.core.data import check_source

        check_source(self.calib)
        for name in ("nsamples", "seqlen"):
            if getattr(self, name) < 1:
                raise SlimlmError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SlimlmError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True, kw_only=True)
class SmallCalibrationConfig(CalibrationConfig):
    """Calibration for steps that only measure (analysis, structure, GGUF importance): llama-imatrix's 32x512."""

    nsamples: int = option(32, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")


@dataclass(frozen=True, kw_only=True)
class HoldoutConfig(Config):
    """The allocation check (``allocate.holdout``) of every step that spreads a budget over the layers."""

    # allocate.holdout: 4 x 512 tokens measure a plan in seconds; at most half the windows are held out
    holdout: int = option(4, "calibration windows held out (never planned on) to measure the allocation against "
                          "its baseline (uniform budgets; for a GGUF --size, llama.cpp's mix that fits it) before "
                          "the run commits; slimlm's own allocators keep the better (0: no check)")

    def check(self) -> None:
        if self.holdout < 0:
            raise SlimlmError(f"--holdout must be at least 0, got {self.holdout}")


@dataclass(frozen=True, kw_only=True)
class AllocationConfig(HoldoutConfig):
    """How a global budget is spread over the layers (``slimlm.allocate``)."""

    allocation: str = option("uniform", "how the target is spread over the layers: uniform, owl, alphapruning, "
                             "errortable, or fisher (slimlm's own)")
    owl_lambda: float = option(0.08, "OWL: budgets span target +- lambda")
    alpha_epsilon: float = option(0.2, "AlphaPruning: ratios span 1 +- epsilon")

    RULES = (Rule(("owl_lambda",), lambda c: c.allocation == "owl", "--allocation owl"),
             Rule(("alpha_epsilon",), lambda c: c.allocation == "alphapruning", "--allocation alphapruning"),
             Rule(("holdout",), lambda c: c.allocation != "uniform", "a non-uniform --allocation"))

    def check(self) -> None:
        from slimlm.allocate import ALLOCATORS

        check_name("allocation", self.allocation, ALLOCATORS, "allocation")
        HoldoutConfig.check(self)

    def allocation_options(self) -> dict:
        """The allocator's own keywords (``allocate.allocate_from_metrics``)."""
        return {"owl": {"lamda": self.owl_lambda}, "alphapruning": {"epsilon": self.alpha_epsilon}}.get(
            self.allocation, {})


@dataclass(frozen=True, kw_only=True)
class GridConfig(Config):
    """An integer weight grid (``quant.grids.QuantGrid``)."""

    group_size: int = option(128, "weights per quantization scale along a row (-1: one scale per output channel)")
    asym: bool = option(False, "asymmetric grid with zero points (default symmetric)")
    scale_dtype: Literal["float16"] | None = option(None, "round scales to float16 (exact GGUF Q4_0/Q4_1/Q8_0 "
                                                    "export; default float32)")

    def grid(self, bits: int, clip: float = 1.0):
        """The grid at ``bits`` (``group_size`` -1 or 0: one scale per output channel)."""
        from slimlm.quant.grids import QuantGrid

        group_size = None if self.group_size in (-1, 0) else self.group_size
        return QuantGrid(bits, not self.asym, group_size, clip, self.scale_dtype)


def _check_sparsity_options(c) -> None:
    from slimlm.pruning.spec import check_budget_options, check_sparsity, parse_pattern

    if c.sparsity is not None:
        check_sparsity(c.sparsity)
    check_budget_options(c.pattern, parse_pattern(c.pattern), c.sparsity, c.allocation, c.budgets_map(),
                         c.overrides())


@dataclass(frozen=True, kw_only=True)
class PruneConfig(CalibrationConfig, AllocationConfig, GridConfig):
    """``slimlm prune``: one pruning method, a global or per-layer sparsity, optionally quantized kept weights."""

    method: str = option("wanda", "magnitude, wanda, sparsegpt, ria")
    sparsity: float | None = option(None, "fraction of zeros per layer, in [0, 1) (default 0.5; not with an N:M "
                                    "pattern, which fixes it)")
    pattern: str = option("unstructured", "unstructured, or N:M to keep N of every M consecutive input weights, "
                          "e.g. 2:4")
    group: Literal["row", "matrix"] | None = option(None, "comparison group (default: the paper's)")
    permute: bool = option(False, "channel permutation before N:M (RIA)")
    ria_alpha: float = option(0.5, "RIA: exponent of the input-channel norms (the paper's 0.5)")
    # SparseGPT paper, section 3: lazy batch updates over 128 columns, 1% dampening of the Hessian diagonal
    blocksize: int = option(128, "SparseGPT: columns per lazy-update block")
    damp: float = option(0.01, "SparseGPT: dampening added to the Hessian, as a fraction of its mean diagonal")
    budgets: str | dict | None = option(None, "JSON file FQN -> sparsity, as written by slimlm allocate --out")
    override: tuple | None = option(None, "per-layer sparsity for the linears whose name matches REGEX (re.search), "
                                    "applied after the allocation or budgets map; repeatable, the first matching "
                                    "REGEX wins", value_type=float)
    wbits: int | None = option(None, "also quantize the kept weights to this many bits (joint sparse + quantized)")

    RULES = AllocationConfig.RULES + (
        Rule(("ria_alpha",), lambda c: c.method == "ria", "--method ria"),
        Rule(("blocksize", "damp"), lambda c: c.method == "sparsegpt", "--method sparsegpt"),
        Rule(("permute",), lambda c: c.pattern != "unstructured" and c.method != "sparsegpt",
             "an N:M --pattern and --method magnitude, wanda or ria"),
        Rule(("group",), lambda c: c.pattern == "unstructured", "--pattern unstructured"),
        Rule(("group_size", "asym", "scale_dtype"), lambda c: c.wbits is not None, "--wbits"),
        Rule(("owl_m",), lambda c: c.allocation == "owl", "--allocation owl"))

    def check(self) -> None:
        from slimlm.pruning.methods import METHODS

        check_name("method", self.method, METHODS, "pruning method")
        CalibrationConfig.check(self)
        AllocationConfig.check(self)
        _check_sparsity_options(self)
        if self.wbits is not None:
            self.grid(self.wbits)
        if self.blocksize < 1 or not 0 <= self.damp:
            raise SlimlmError(f"--blocksize must be at least 1 and --damp at least 0, got {self.blocksize}, "
                              f"{self.damp}")

    def budgets_map(self) -> dict | None:
        """FQN -> sparsity of ``budgets`` (a file read, or the mapping given from Python)."""
        if self.budgets is None or isinstance(self.budgets, dict):
            return self.budgets
        return read_json(self.budgets)

    def overrides(self) -> dict | None:
        return dict(self.override) if self.override else None


TRANSFORMS = ("none", "smoothquant", "duquant", "flatquant")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(CalibrationConfig, AllocationConfig, GridConfig):
    """``slimlm quantize``: weights onto an integer grid (RTN, GPTQ), optionally rotated or transformed, with
    simulated activation and KV-cache quantization."""

    method: str = option("gptq", "rtn: round to nearest (no data); gptq: error-correcting, on calibration data")
    wbits: int = option(4, "bits per weight, 2 to 8")
    act_order: bool = option(False, "GPTQ: columns by decreasing Hessian diagonal")
    one_pass: bool = option(False, "GPTQ: calibrate every block on the dense model's activations (one pass, ~half "
                            "the time)")
    # GPTQ paper, section 4 (Step 2, lazy batch updates) and its code's 1% dampening
    blocksize: int = option(128, "GPTQ: columns per lazy-update block")
    damp: float = option(0.01, "GPTQ: dampening added to the Hessian, as a fraction of its mean diagonal")
    abits: int | None = option(None, "simulated per-token activation quantization (e.g. 4 for W4A4)")
    act_clip: float | None = option(None, "with --abits: activation clipping ratio (default: the transform's, "
                                    "DuQuant 0.9; otherwise 1, no clipping)")
    act_grid: Literal["sym", "asym"] | None = option(None, "with --abits: symmetric or asymmetric per-token grid "
                                                     "(default: the transform's, DuQuant asym; otherwise sym as "
                                                     "QuaRot)")
    kvbits: int | None = option(None, "simulated KV-cache quantization after RoPE, per head and token, asymmetric "
                                "(e.g. 4 for W4A4KV4)")
    kv_clip: float = option(1.0, "with --kvbits: KV clipping ratio (1: none)")
    rotate: Literal["none", "hadamard"] = option("none", "hadamard: QuaRot's rotation before quantizing")
    transform: Literal[TRANSFORMS] = option(
        "none", "outlier-aware transform of each linear's input, calibrated block by block: smoothquant "
        "(per-channel scales folded into the norms), duquant (smoothing, block rotations, zigzag permutation, second "
        "rotation; online) or flatquant (learned affine transforms and clipping, trained per block against the "
        "full-precision block)")
    alpha: float | None = option(None, "with --transform: smoothing exponent (default: SmoothQuant 0.5, DuQuant 0.6; "
                                 "FlatQuant 0.3, its scales' starting point)")
    lwc: bool = option(False, "with --transform duquant: learn each weight row's clipping range per block "
                       "(DuQuant+LWC) instead of the fixed 0.8")
    epochs: int | None = option(None, "training epochs per block of --transform flatquant (default 15, the "
                                "paper's) or of --lwc (default 20)")
    weight_clip: float | None = option(None, "weight clipping ratio (default: the transform's, DuQuant 0.8; "
                                       "otherwise 1)")
    intact_kv: Literal["bos", "prefix"] | None = option(
        None, "IntactKV: start every sequence from the full-precision model's KV cache of [BOS] (bos) or of [BOS] + "
        "--intact-prefix (prefix; the text alone for tokenizers without BOS, e.g. Qwen's)")
    intact_prefix: str | None = option(None, "with --intact-kv prefix: the fixed text (e.g. a system prompt)")
    calibrate_kv: bool = option(False, "with --intact-kv: tune the kept cache so that the quantized model's layer "
                                "outputs match the full-precision model's (IntactKV+Cal; 160 steps)")
    avg_bits: float | None = option(None, "mixed precision: per-layer bits with this weighted mean")
    override: tuple | None = option(None, "per-layer bit-width for the linears whose name matches REGEX "
                                    "(re.search), applied after the allocation; repeatable, the first matching "
                                    "REGEX wins", value_type=int)

    RULES = AllocationConfig.RULES + (
        Rule(("owl_m",), never, "prune or analyze (quantize's owl allocation keeps M at 5)"),
        Rule(("act_order", "blocksize", "damp"), lambda c: c.method == "gptq", "--method gptq"),
        Rule(("one_pass",), lambda c: c.method == "gptq" and c.transform != "flatquant",
             "--method gptq without --transform flatquant (which always calibrates on full-precision activations)"),
        # act-clip 1.0 (no clipping) was the default before transforms had their own: older recipes carry it
        Rule(("act_clip",), lambda c: c.abits is not None or c.act_clip == 1.0, "--abits"),
        Rule(("act_grid",), lambda c: c.abits is not None, "--abits"),
        Rule(("kv_clip",), lambda c: c.kvbits is not None, "--kvbits"),
        Rule(("alpha",), lambda c: c.transform != "none", "--transform smoothquant, duquant or flatquant"),
        Rule(("epochs",), lambda c: c.transform == "flatquant" or c.lwc, "--transform flatquant or --lwc"),
        Rule(("lwc",), lambda c: c.transform == "duquant", "--transform duquant"),
        Rule(("intact_prefix",), lambda c: c.intact_kv == "prefix", "--intact-kv prefix"),
        Rule(("calibrate_kv",), lambda c: c.intact_kv is not None, "--intact-kv"))

    def check(self) -> None:
        from slimlm.quant.methods import QUANTIZERS

        check_name("method", self.method, QUANTIZERS, "quantization method")
        CalibrationConfig.check(self)
        AllocationConfig.check(self)
        self.grid(self.wbits)
        for _, bits in self.override or ():
            self.grid(bits)
        self.runtime().validate()
        if self.allocation != "uniform" and self.avg_bits is None:
            raise SlimlmError(f"allocation '{self.allocation}' spreads an average bit-width: give avg-bits too")
        if self.blocksize < 1 or not 0 <= self.damp:
            raise SlimlmError(f"--blocksize must be at least 1 and --damp at least 0, got {self.blocksize}, "
                              f"{self.damp}")

    def runtime(self):
        """What runs at inference (``hooks.runtime.Runtime``), with the transform's defaults filled in."""
        from slimlm.hooks.runtime import Runtime

        transform = None if self.transform == "none" else self.transform
        online_kv = self.kvbits is not None and (self.rotate == "hadamard" or transform == "duquant")
        return Runtime(transform, self.alpha, self.weight_clip, self.abits, self.act_clip,
                       None if self.act_grid is None else self.act_grid == "sym", self.kvbits, self.kv_clip,
                       online_kv, self.intact_kv, self.intact_prefix, self.lwc).resolved()

    def overrides(self) -> dict | None:
        return dict(self.override) if self.override else None


@dataclass(frozen=True, kw_only=True)
class GGUFConfig(SmallCalibrationConfig, HoldoutConfig):
    """``slimlm gguf``: any model onto llama.cpp's weight types, one file. Calibration defaults are
    llama-imatrix's protocol (32 windows of 512 tokens)."""

    type: str = option("Q4_K_M", "llama.cpp file type: its per-tensor types are the ones llama-quantize picks "
                       "for it")
    method: Literal["rtn", "gptq"] = option("gptq", "rtn: the format's weighted scale search and rounding; gptq: "
                                            "GPTQ onto the stored grid, on calibration data")
    imatrix: bool = option(False, "rtn: weigh the scale search by each input's mean squared activation on "
                           "calibration data (llama-imatrix's importance)")
    act_order: bool = option(False, "gptq: columns by decreasing Hessian diagonal inside each block")
    blocksize: int = option(128, "gptq: columns per lazy-update block")
    damp: float = option(0.01, "gptq: dampening added to the Hessian, as a fraction of its mean diagonal")
    size: str | None = option(None, "our own per-tensor types fitted to this size instead of the mix's rule for the "
                              "decoder blocks: bits per weight over all tensors (5.5bpw) or tensor bytes (100MB); "
                              "costs from measured Fisher information on the calibration data")
    token_embedding_type: str | None = option(None, "type of the token embedding (token_embd), as llama-quantize's "
                                              "--token-embedding-type: F16, Q8_0, Q6_K, ... (default: the mix's)")
    out: str = option(MISSING, "new .gguf file (or new folder) to write")

    RULES = (
        Rule(("owl_m",), never, "prune or analyze"),
        Rule(("batch_size",), lambda c: c.method == "gptq" or c.imatrix, "--method gptq or --imatrix"),
        Rule(("imatrix",), lambda c: c.method == "rtn", "--method rtn"),
        Rule(("act_order", "blocksize", "damp"), lambda c: c.method == "gptq", "--method gptq"),
        Rule(CALIBRATION, lambda c: c.method == "gptq" or c.imatrix or c.size is not None,
             "--method gptq, --imatrix or --size"),
        Rule(("holdout",), lambda c: c.size is not None, "--size"))

    def uses_data(self) -> bool:
        """Whether calibration windows are read: GPTQ's Hessians (float file types round nothing), the imatrix's
        importance, or the size mix's Fisher costs."""
        return (self.method == "gptq" and self.type not in ("F16", "F32")) or self.imatrix or self.size is not None

    def check(self) -> None:
        from slimlm.gguf.mixes import MIXES
        from slimlm.gguf.sizing import parse_size
        from slimlm.gguf.types import TYPES

        object.__setattr__(self, "type", self.type.upper())
        if self.type not in MIXES:
            raise SettingError("type", f"unknown GGUF mix '{self.type}'{closest(self.type, MIXES)}; choose one of "
                               f"{', '.join(MIXES)}")
        CalibrationConfig.check(self)
        if self.size is not None:
            parse_size(self.size)
        HoldoutConfig.check(self)
        if self.token_embedding_type is not None:
            object.__setattr__(self, "token_embedding_type", self.token_embedding_type.upper())
            check_name("token_embedding_type", self.token_embedding_type, {**TYPES, "F16": None, "F32": None},
                       "GGUF type")
