"""Outlier-aware transforms inside the block loop: each set of linears that read one input is transformed from
its calibration statistics, then quantized on its transformed Hessian (``quantize`` wraps its callback here).

For a set of linears reading X (q/k/v, o_proj, gate/up, down_proj), a transform T (``transforms.ops``) makes
them read X T and hold W T⁻ᵀ. Scales right after a norm are folded into it (free at inference); everything
else runs online in the linears' input hooks. GPTQ then needs the Hessian of X T, which is Tᵀ H T: no second
calibration pass.

Methods (``TRANSFORMS``): ``smoothquant`` (``transforms.smoothquant``: the sets after a norm only, as the paper),
``duquant`` (``transforms.duquant``: smoothing of every set, then R̂₁ P R̂₂; with ``lwc`` its clipping is learned per
block), ``flatquant`` (``transforms.flatquant``: learned per block, before its linears are quantized, through the
engine's ``prepare`` step). Llama-family models only: the fold into the norm assumes RMSNorm's w ⊙ x̂ (Gemma's
(1 + w) is refused, as for QuaRot's rotation).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from slimlm.core.architectures import block_of
from slimlm.core.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.hooks.kvcache import kv_specs_
from slimlm.transforms.duquant import MAX_STEPS, dual_transform
from slimlm.transforms.ops import Op, set_transform_, transform_hessian, transform_weight
from slimlm.transforms.smoothquant import smoothing_scales

log = logging.getLogger(__name__)

TRANSFORMS = ("smoothquant", "duquant", "flatquant")
# the norm whose output each set of linears reads (names inside a Llama-family block)
NORM_READERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass(frozen=True)
class TransformSettings:
    """``alpha``: the smoothing exponent (SmoothQuant's α); ``steps``: DuQuant's greedy rotation steps per
    rotation; ``seed``: the random part of DuQuant's rotations."""

    name: str
    alpha: float
    steps: int = MAX_STEPS
    seed: int = 0
    lwc: bool = False  # DuQuant+LWC: learned weight clipping per block (``duquant.fit_lwc_``)

    def __post_init__(self):
        if self.name not in TRANSFORMS:
            raise SlimlmError(f"unknown transform '{self.name}'; choose one of {', '.join(TRANSFORMS)}")
        smoothing_scales(torch.ones(1), [torch.ones(1, 1)], self.alpha)  # alpha in [0, 1]
        if self.steps < 0:
            raise SlimlmError(f"rotation steps must be >= 0, got {self.steps}")


def _norm_for(model: nn.Module, group: dict[str, nn.Linear]) -> nn.Module | None:
    """The norm whose output is the group's input, when the group holds all of that norm's readers."""
    block = block_of(next(iter(group)))
    names = {fqn[len(block) + 1:] for fqn in group}
    for norm, readers in NORM_READERS.items():
        if names == set(readers):
            return model.get_submodule(f"{block}.{norm}")
    return None


def group_transform(model: nn.Module, group: dict[str, nn.Linear], stats: LayerStats,
                    settings: TransformSettings) -> list[Op]:
    """The ops for one set of linears from its input statistics ([] when the method leaves it alone)."""
    norm = _norm_for(model, group)
    if settings.name == "smoothquant" and norm is None:
        return []
    s = smoothing_scales(stats.absmax, [lin.weight for lin in group.values()], settings.alpha)
    ops = [Op("scale", (1 / s,), fused=norm is not None)]
    if settings.name == "duquant":
        ops += dual_transform(stats.window_mean / s, settings.steps, settings.seed)
    return ops


def apply_group_(model: nn.Module, group: dict[str, nn.Linear], ops: list[Op]) -> None:
    """Fold the fused scale into the norm, transform every weight, hook the online ops on every linear."""
    fused = [op for op in ops if op.fused]
    if fused:
        norm = _norm_for(model, group)
        with torch.no_grad():
            norm.weight.copy_(norm.weight.double().mul(fused[0].tensors[0].double()))
    for lin in group.values():
        with torch.no_grad():
            lin.weight.copy_(transform_weight(lin.weight, ops))
        set_transform_(lin, ops)


def transformed_stats(stats: LayerStats, ops: list[Op]) -> LayerStats:
    """The statistics of the transformed input X T (the Hessian; channel norms from its diagonal)."""
    if stats.hessian is None:
        return stats
    H = transform_hessian(stats.hessian, ops)
    return LayerStats(stats.ntokens, torch.diagonal(H) * stats.ntokens / 2, H)


def transforming(model: nn.Module, settings: TransformSettings, compress, sites: dict[str, list[Op]]):
    """A block-loop callback that transforms each set of linears before ``compress`` quantizes it; ``sites``
    collects every transformed linear's ops (FQN -> ops) for the run record. FlatQuant's ops are already in
    ``sites`` and in the weights (its block-level training, ``flat_preparer``): only the Hessian follows them."""
    def transform_then_compress(group, stats):
        if settings.name == "flatquant" or settings.lwc:  # transformed by the block-level step already
            ops = sites.get(next(iter(group)), [])
        else:
            ops = group_transform(model, group, stats, settings)
            if ops:
                apply_group_(model, group, ops)
                sites.update(dict.fromkeys(group, ops))
        if ops:
            stats = transformed_stats(stats, ops)
        return bool(compress(group, stats)) or bool(ops)
    return transform_then_compress


def flat_preparer(settings: TransformSettings, grid, abits, act_symmetric: bool, kvbits, sites: dict,
                  learned: dict, epochs: int):
    """The engine's ``prepare`` callback for FlatQuant: train and fix each block's transforms on the
    full-precision block's inputs and outputs, log its loss; fills ``sites`` (FQN -> ops) and ``learned``
    (activation clips by FQN; per block index: its ``KVQuant``, value transform, losses and seconds)."""
    from slimlm.transforms.flatquant import calibrate_block_

    learned["epochs"] = epochs

    def prepare(i, block, inputs, outputs, call_args, stats):
        prefix = block_of(next(iter(stats))) + "."
        absmax = {fqn[len(prefix):]: s.absmax for fqn, s in stats.items()}
        rec = calibrate_block_(block, inputs, outputs, call_args, absmax, grid, abits, act_symmetric, kvbits,
                               settings.seed, epochs, settings.alpha)
        sites.update({prefix + name: ops for name, ops in rec["ops"].items()})
        learned.setdefault("act_clips", {}).update({prefix + n: c for n, c in rec["act_clips"].items()})
        learned.setdefault("blocks", {})[i] = rec
        log.info("flatquant block %d: loss %.4g -> %.4g in %.0f s", i, *rec["loss"], rec["seconds"])
    return prepare


def lwc_preparer(model: nn.Module, settings: TransformSettings, grid, runtime, sites: dict, learned: dict,
                 epochs: int):
    """The engine's ``prepare`` callback for DuQuant+LWC: transform every set of linears of the block from its
    statistics, then learn and bake the block's weight clipping (``duquant.fit_lwc_``), logging its loss."""
    from slimlm.transforms.duquant import fit_lwc_

    learned["epochs"] = epochs

    def prepare(i, block, inputs, outputs, call_args, stats):
        start = time.perf_counter()
        groups: dict[int, tuple[LayerStats, dict]] = {}
        for fqn, s in stats.items():  # linears that read one input share one LayerStats
            groups.setdefault(id(s), (s, {}))[1][fqn] = model.get_submodule(fqn)
        for s, group in groups.values():
            ops = group_transform(model, group, s, settings)
            apply_group_(model, group, ops)
            sites.update(dict.fromkeys(group, ops))
        loss = fit_lwc_(block, grid, runtime.abits, runtime.act_symmetric, runtime.act_clip, inputs, outputs,
                        call_args, epochs)
        learned.setdefault("blocks", {})[i] = {"loss": loss, "seconds": time.perf_counter() - start}
        log.info("duquant lwc block %d: loss %.4g -> %.4g", i, *loss)
    return prepare


def transform_callbacks(model: nn.Module, runtime, grid, compress, sites: dict, learned: dict, seed: int,
                        epochs: int | None):
    """(compress, prepare) for the engine: ``compress`` wrapped by ``transforming``, and the block-level training
    (FlatQuant, DuQuant+LWC) as ``prepare`` (None for the others). ``runtime``: the run's ``hooks.runtime.Runtime``;
    ``epochs`` None: the method's own (FlatQuant 15, LWC 20)."""
    from slimlm.transforms.duquant import LWC_EPOCHS
    from slimlm.transforms.flatquant import EPOCHS

    settings = TransformSettings(runtime.transform, runtime.alpha, seed=seed, lwc=runtime.lwc)
    prepare = None
    if settings.lwc:
        prepare = lwc_preparer(model, settings, grid, runtime, sites, learned, epochs or LWC_EPOCHS)
    elif runtime.transform == "flatquant":
        epochs = epochs or EPOCHS
        if runtime.kvbits is not None:
            kv_specs_(model)  # the attention wrapper that calls each block's key/value quantizer
        prepare = flat_preparer(settings, grid, runtime.abits, runtime.act_symmetric, runtime.kvbits, sites,
                                learned, epochs)
    return transforming(model, settings, compress, sites), prepare
