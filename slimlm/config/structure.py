"""The configs of the steps that change the model's shapes or basis: shrink (depth and width), lowrank, rotate."""
from __future__ import annotations

from dataclasses import MISSING, dataclass
from typing import Literal

from slimlm.config.compress import CALIBRATION, HoldoutConfig, SmallCalibrationConfig
from slimlm.config.schema import Config, Rule, option
from slimlm.errors import SlimlmError


@dataclass(frozen=True, kw_only=True)
class ShrinkConfig(SmallCalibrationConfig, HoldoutConfig):
    """``slimlm shrink``: remove whole decoder layers (depth) or attention heads and MLP channels (width)."""

    drop_layers: int | None = option(None, "depth: remove N whole decoder layers", metavar="N")
    score: Literal["influence", "loss"] = option(
        "influence", "depth: which layers go first; influence: ShortGPT's 1 - cos(input, output); loss: the measured "
        "calibration-loss increase when the layer alone is skipped (slimlm's)")
    iterative: bool = option(False, "depth: remove one layer at a time, scoring the smaller model again each time")
    params: float | None = option(None, "width: fraction of the decoder layers' parameters to keep (attention head "
                                  "groups and MLP channels are removed)", metavar="FRACTION")
    method: Literal["flap", "fisher", "slicegpt"] = option(
        "flap", "width: which heads and channels go; flap: FLAP's fluctuation metric; fisher: estimated loss increase "
        "(slimlm's); slicegpt: instead narrow the residual stream to its principal directions (SliceGPT; loads "
        "through slimlm only, no GGUF)")
    allocation: Literal["auto", "uniform", "owl", "alphapruning", "flap", "fisher"] = option(
        "auto", "width: how many units each layer loses; auto: the method's own (flap: FLAP's global ranking of "
        "standardised scores; fisher: global ranking by loss per parameter; slicegpt: uniform, its only one)")
    no_compensate: bool = option(False, "width: no FLAP bias compensation of the removed channels' mean output")

    RULES = (Rule(("score", "iterative"), lambda c: c.drop_layers is not None, "--drop-layers"),
             Rule(("method", "allocation", "no_compensate"), lambda c: c.params is not None, "--params"),
             Rule(("no_compensate",), lambda c: c.method != "slicegpt", "--method flap or fisher"),
             Rule(("owl_m",), lambda c: c.allocation == "owl", "--allocation owl"),
             Rule(("holdout",), lambda c: c.params is not None and c.resolved_allocation != "uniform",
                  "--params and a non-uniform allocation"))

    def check(self) -> None:
        from slimlm.structured.widths import check_keep

        SmallCalibrationConfig.check(self)
        HoldoutConfig.check(self)
        if (self.drop_layers is None) == (self.params is None):
            raise SlimlmError("give --drop-layers N (depth) or --params FRACTION (width), one of the two")
        if self.drop_layers is not None and self.drop_layers < 1:
            raise SlimlmError(f"--drop-layers must be at least 1, got {self.drop_layers}")
        if self.params is not None:
            check_keep(self.params)
        if self.method == "slicegpt" and self.allocation not in ("auto", "uniform"):
            raise SlimlmError(f"SliceGPT slices every block's residual alike; allocation '{self.allocation}' does "
                              "not apply (use uniform)")

    @property
    def resolved_allocation(self) -> str:
        """``auto`` as the method's own allocation."""
        return resolve_allocation(self.allocation, self.method)


def resolve_allocation(allocation: str, method: str) -> str:
    if allocation != "auto":
        return allocation
    return {"svdllm": "uniform", "slicegpt": "uniform"}.get(method, method)


@dataclass(frozen=True, kw_only=True)
class LowrankConfig(SmallCalibrationConfig, HoldoutConfig):
    """``slimlm lowrank``: factor the decoder layers' linears into two smaller ones."""

    params: float = option(MISSING, "fraction of the decoder layers' linear parameters to keep", metavar="FRACTION")
    method: Literal["svdllm", "welore"] = option(
        "svdllm", "svdllm: SVD of the weight whitened by its calibration inputs (truncation-aware); welore: plain SVD "
        "of the weight")
    allocation: Literal["auto", "uniform", "welore", "owl", "alphapruning", "fisher"] = option(
        "auto", "ranks per matrix; auto: the method's own (svdllm: uniform; welore: its global threshold on "
        "normalised singular values); fisher: truncation loss priced in loss units (slimlm's)")
    merge: bool = option(False, "multiply the factors back into dense weights (the truncation stays, the savings "
                         "go: for engines that cannot hold factors, such as GGUF)")

    RULES = (Rule(CALIBRATION, lambda c: c.uses_data(), "--method svdllm, --allocation owl or fisher, or the "
                  "allocation check (--holdout) of a non-uniform allocation"),
             Rule(("owl_m",), lambda c: c.allocation == "owl", "--allocation owl"),
             Rule(("holdout",), lambda c: c.resolved_allocation != "uniform", "a non-uniform allocation"))

    def uses_data(self) -> bool:
        """Whether calibration windows are read: SVD-LLM's Grams, the OWL or Fisher metrics, or the held-out windows
        the allocation check measures on (WeLore's own rule is data-free; --holdout 0 keeps it so)."""
        return self.method == "svdllm" or self.allocation in ("owl", "fisher") or (
            self.resolved_allocation != "uniform" and self.holdout > 0)

    def check(self) -> None:
        from slimlm.structured.widths import check_keep

        SmallCalibrationConfig.check(self)
        HoldoutConfig.check(self)
        check_keep(self.params)

    @property
    def resolved_allocation(self) -> str:
        return resolve_allocation(self.allocation, self.method)


@dataclass(frozen=True, kw_only=True)
class RotateConfig(Config):
    """A recipe's ``rotate`` step: QuaRot's randomized Hadamard rotations, before any pruning or quantization."""

    seed: int = option(0, "seed of QuaRot's randomized Hadamard rotations")
    no_online_down: bool = option(False, "leave down_proj's input unrotated: no Hadamard hook at inference, so the "
                                  "run exports to GGUF and compressed-tensors (weights are rotated offline only; "
                                  "activation outliers before down_proj stay)")
