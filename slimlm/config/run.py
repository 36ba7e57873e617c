"""The configs of a run as a whole (which model, how it is loaded) and of the steps that measure or write it:
eval, analyze, export."""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Literal

from slimlm.config.compress import CALIBRATION, SmallCalibrationConfig
from slimlm.config.schema import Config, Rule, option
from slimlm.errors import SlimlmError


@dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """A recipe's run-level keys: the model, how it is loaded, where its blocks compute, and the run folder."""

    model: str = option(MISSING, "built-in alias (smollm2-135m), HF folder, .gguf file, or hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dtype of the weights while computing and in the saved run or file")
    device: str = option("cpu", "compute device (cpu, cuda, cuda:1); the model stays on the CPU and each block "
                         "visits the device in turn")
    data_dir: str | None = option(None, "offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                                  "default: $SLIMLM_DATA_DIR, else the datasets library")
    out: str | None = option(None, "the run folder")


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """Test perplexity over non-overlapping windows (the pruning papers' protocol)."""

    eval_dataset: str = option("wikitext2", "wikitext2, c4, or a text file")
    eval_seqlen: int = option(2048, "tokens per evaluation window")
    eval_windows: int | None = option(None, "evaluate the first N windows only (default: every window of the test "
                                      "text, as the protocol asks: 147 windows of 2048 tokens for WikiText-2 with the "
                                      "built-in model, minutes to hours on a CPU)", metavar="N")

    def check(self) -> None:
        from slimlm.core.data import check_source

        check_source(self.eval_dataset)
        if self.eval_seqlen < 2:
            raise SlimlmError(f"evaluation windows need at least 2 tokens (--eval-seqlen), got {self.eval_seqlen}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise SlimlmError("the number of evaluation windows (--eval-windows) must be at least 1, got "
                              f"{self.eval_windows}")


@dataclass(frozen=True, kw_only=True)
class AnalyzeConfig(SmallCalibrationConfig):
    """``slimlm analyze``: per-layer weight spectra, activation metrics and Fisher tables, with plots."""

    no_calib: bool = option(False, "weight metrics only (no calibration pass)")
    no_fisher: bool = option(False, "skip the gradient pass behind --allocation fisher")
    fisher_for: Literal["wanda", "sparsegpt"] = option(
        "wanda", "price the fisher tables for this method's changes (sparsegpt: slower, ~1 min per level)")
    esd_layer: str | None = option(None, "FQN of the layer whose ESD is plotted (default: the first)")
    target: str = option("sparsity=0.7", "global budget whose per-layer maps are plotted: sparsity=0.7, bits=3.5 or "
                         "rank=0.5")
    out: str | None = option(None, "the analysis folder (default: the recipe's out)")

    RULES = (Rule(CALIBRATION, lambda c: not c.no_calib, "a calibration pass (not with --no-calib)"),
             Rule(("fisher_for",), lambda c: not (c.no_calib or c.no_fisher),
                  "the fisher tables (not with --no-calib or --no-fisher)"))

    def check(self) -> None:
        from slimlm.allocate import parse_target

        SmallCalibrationConfig.check(self)
        parse_target(self.target)


@dataclass(frozen=True, kw_only=True)
class ExportConfig(Config):
    """``slimlm export``: a saved run in an engine's format."""

    format: Literal["compressed-tensors", "sparse", "gguf"] = option(
        MISSING, "compressed-tensors (vLLM), sparse (slimlm's masks and kept values), gguf (llama.cpp)")
    out: str = option(MISSING, "output folder, or for gguf a .gguf file (never overwritten)")
    inexact: bool = option(False, "compressed-tensors: allow scales within an ulp (bf16/fp16 runs); gguf: round "
                           "block scales to float16 and report the deviation")
    gguf_type: str = option("auto", "gguf: auto (the run's grid where a block type holds it exactly, else the run's "
                            "float dtype), f32, f16, bf16, q8_0, q4_0, q4_1")

    RULES = (Rule(("gguf_type",), lambda c: c.format == "gguf", "--format gguf"),
             Rule(("inexact",), lambda c: c.format != "sparse", "--format compressed-tensors or gguf"))
