"""What a quantized model runs at inference besides its weights, recorded in the run and re-attached on load.

A W4A4KV4 run is more than its safetensors: online input transforms (DuQuant's rotations, QuaRot's down_proj
Hadamard), per-token activation quantizers, KV-cache quantizers and IntactKV's full-precision pivot cache all
live in hooks. ``Runtime`` holds the user's settings with each method's defaults resolved; ``runtime_record`` writes
them into the manifest (and their tensors into ``runtime.safetensors`` beside the model); ``apply_runtime``
puts every piece back on a reloaded model, so that it computes what was measured at quantize time.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from slimlm.core import distributed
from slimlm.core.architectures import linear_fqns
from slimlm.errors import SlimlmError
from slimlm.hooks import intactkv
from slimlm.hooks.kvcache import attention_modules, kv_specs_, quantize_kv_
from slimlm.quant.grids import QuantGrid
from slimlm.transforms.hadamard import random_hadamard
from slimlm.transforms.ops import from_record, set_activation_quant_, set_transform_
from slimlm.transforms.outliers import TRANSFORMS, TransformSettings
from slimlm.transforms.rotate import ROTATABLE, attach_online_down_, quantize_activations_

RUNTIME_FILE = "runtime.safetensors"
KEY_SEED_OFFSET = 3  # after rotate_'s residual (0), value-head (1) and down_proj (2) rotations
# per method: (smoothing alpha, weight clip, activation clip, symmetric activations), the papers' settings:
# SmoothQuant α 0.5; DuQuant run.sh α 0.6, --swc 0.8, --lac 0.9, asymmetric per-token activations
# FlatQuant (its w4a4kv4.sh scripts): α 0.3 initialises its per-channel scales; clipping is learned (LWC, LAC);
# symmetric activations
# DuQuant+LWC (run_lwc.sh): α 0.5, the weight clipping learned instead of fixed
DEFAULTS = {None: (None, 1.0, 1.0, True), "smoothquant": (0.5, 1.0, 1.0, True), "duquant": (0.6, 0.8, 0.9, False),
            "duquant+lwc": (0.5, 1.0, 0.9, False), "flatquant": (0.3, 1.0, 1.0, True)}


@dataclass(frozen=True)
class Runtime:
    transform: str | None = None
    alpha: float | None = None
    weight_clip: float | None = None
    abits: int | None = None
    act_clip: float | None = None
    act_symmetric: bool | None = None
    kvbits: int | None = None
    kv_clip: float = 1.0
    key_rotation: bool = False  # per-head Hadamard on queries and keys after RoPE (QuaRot, DuQuant)
    intact_kv: str | None = None
    intact_prefix: str | None = None
    lwc: bool = False

    def resolved(self) -> Runtime:
        if self.transform not in (None, *TRANSFORMS):
            raise SlimlmError(f"unknown transform '{self.transform}'; choose one of {', '.join(TRANSFORMS)}")
        if self.lwc and self.transform != "duquant":
            raise SlimlmError("learned weight clipping (lwc) is DuQuant's option; FlatQuant learns its own")
        alpha, weight_clip, act_clip, symmetric = DEFAULTS["duquant+lwc" if self.lwc else self.transform]
        if self.alpha is not None and self.transform is None:
            raise SlimlmError("alpha is the smoothing exponent of a transform; it needs transform=smoothquant, "
                              "duquant or flatquant")
        if self.abits is None and (self.act_symmetric is not None or self.act_clip not in (None, 1.0)):
            raise SlimlmError("act_clip and act_symmetric shape the activation grid: they need abits")
        if self.kvbits is None and self.kv_clip != 1.0:
            raise SlimlmError("kv_clip clips the KV-cache grid: it needs kvbits")
        return replace(self, alpha=self.alpha if self.alpha is not None else alpha,
                       weight_clip=self.weight_clip if self.weight_clip is not None else weight_clip,
                       act_clip=self.act_clip if self.act_clip is not None else act_clip,
                       act_symmetric=self.act_symmetric if self.act_symmetric is not None else symmetric)

    def validate(self) -> None:
        """The settings' own ranges (bits 2..8, clips in (0, 1], alpha in [0, 1]); ``check`` adds the model's
        part."""
        if self.transform is not None:
            TransformSettings(self.transform, self.alpha, lwc=self.lwc)
        QuantGrid(8, clip_ratio=self.weight_clip)
        for what, bits, clip in (("activation", self.abits, self.act_clip), ("KV-cache", self.kvbits, self.kv_clip)):
            try:
                QuantGrid(bits if bits is not None else 8, clip_ratio=clip)
            except SlimlmError as e:
                raise SlimlmError(f"{what} quantization: {e}") from None
        if self.intact_kv is not None and self.intact_kv not in intactkv.MODES:
            raise SlimlmError(f"unknown IntactKV mode '{self.intact_kv}'; choose {' or '.join(intactkv.MODES)}")

    def check(self, model: nn.Module, rotated: bool = False, streamed: bool = False, resumed: bool = False) -> None:
        """Every setting valid for ``model`` and the run (QuaRot's rotation, disk offload, resume), before
        anything changes it."""
        self.validate()
        if self.transform is not None and rotated:
            raise SlimlmError("choose one: QuaRot's rotation (rotate='hadamard') or a transform")
        if streamed and (rotated or self.abits or self.kvbits or self.transform or self.intact_kv):
            raise SlimlmError("--offload disk quantizes weights block by block only: no --rotate, --transform, "
                              "--abits, --kvbits or --intact-kv")
        if resumed and self.transform is not None:
            raise SlimlmError("a run with a transform cannot resume: its transforms are kept in memory until saved")
        if self.transform is not None and distributed.world() > 1:
            raise SlimlmError("a transform calibrates in one process (its statistics and training are not shared "
                              "between ranks yet); run it without torchrun")
        if self.kvbits is not None or self.intact_kv is not None:
            attention_modules(model)
        if self.transform is not None and model.config.model_type not in ROTATABLE:
            raise SlimlmError(f"transform {self.transform} supports {', '.join(ROTATABLE)}; got "
                              f"'{model.config.model_type}'")


def key_rotation(model: nn.Module, seed: int) -> torch.Tensor:
    return random_hadamard(attention_modules(model)[0].head_dim, seed + KEY_SEED_OFFSET, torch.float64)


def runtime_record(runtime: Runtime, seed: int, sites: dict, pivots: list | None, pivot_ids: list[int] | None,
                   learned: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest entries of ``runtime`` and the tensors to save in ``RUNTIME_FILE`` (empty: no file).
    ``learned``: FlatQuant's per-linear activation clips and per-block KV quantizers and value transforms
    (``transforms.outliers.flat_preparer``); the pivot cache's values are moved into the blocks' value bases."""
    from slimlm.transforms.ops import to_record

    sites_record, tensors = to_record(sites)
    blocks = (learned or {}).get("blocks", {})
    if pivots is not None:
        pivots = [(k, v @ blocks[i]["values"].to(v)) if "values" in blocks.get(i, {}) else (k, v)
                  for i, (k, v) in enumerate(pivots)]
        tensors |= intactkv.to_tensors(pivots)
    kv_learned = runtime.kvbits is not None and any(rec.get("kv") for rec in blocks.values())
    if kv_learned:
        tensors |= {f"kv.{i}.key_rotation": rec["kv"].key_rotation.contiguous() for i, rec in blocks.items()}
    entries = {
        "transform": {"method": runtime.transform, "alpha": runtime.alpha, "lwc": runtime.lwc, "sites": sites_record,
                      **({"training": {"epochs": learned["epochs"],
                                       "block_losses": [list(blocks[i]["loss"]) for i in sorted(blocks)],
                                       "block_seconds": [blocks[i]["seconds"] for i in sorted(blocks)]}}
                         if blocks else {})}
        if runtime.transform else None,
        "weight_clip": runtime.weight_clip,
        "act_symmetric": runtime.act_symmetric,
        "act_clips": (learned or {}).get("act_clips"),
        "kv_cache": {"bits": runtime.kvbits, "clip": runtime.kv_clip, "symmetric": False, "seed": seed,
                     "key_rotation": "learned" if kv_learned else "hadamard" if runtime.key_rotation else None,
                     **({"clips": [[blocks[i]["kv"].clip, blocks[i]["kv"].value_clip] for i in sorted(blocks)]}
                        if kv_learned else {})}
        if runtime.kvbits is not None else None,
        "intact_kv": {"mode": runtime.intact_kv, "prefix": runtime.intact_prefix, "tokens": pivot_ids,
                      "calibrated": False}
        if pivots is not None else None,
    }
    return entries, tensors


def attach_(model: nn.Module, manifest: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put a run's online transforms, activation and KV quantizers and pivot cache on ``model``."""
    transform = manifest.get("transform")
    if transform:
        linears = linear_fqns(model)
        for fqn, ops in from_record(transform["sites"], tensors).items():
            set_transform_(linears[fqn], ops)
    if manifest.get("abits"):
        symmetric = manifest.get("act_symmetric", True)
        quantize_activations_(model, manifest["abits"], manifest.get("act_clip", 1.0), symmetric=symmetric)
        linears = linear_fqns(model)
        for fqn, clip in (manifest.get("act_clips") or {}).items():
            set_activation_quant_(linears[fqn], manifest["abits"], clip, symmetric)
    kv = manifest.get("kv_cache")
    if kv:
        rotation = key_rotation(model, kv["seed"]) if kv.get("key_rotation") == "hadamard" else None
        quantize_kv_(model, kv["bits"], kv["clip"], rotation)
    if kv and kv.get("key_rotation") == "learned":
        for i, (spec, (k_clip, v_clip)) in enumerate(zip(kv_specs_(model), kv["clips"])):
            K = tensors[f"kv.{i}.key_rotation"]
            spec.key_rotation, spec.query_rotation = K, torch.linalg.inv(K.double()).mT.float()
            spec.clip, spec.value_clip = k_clip, v_clip
    if manifest.get("intact_kv"):
        intactkv.attach_(model, intactkv.from_tensors(tensors))


def apply_runtime(model: nn.Module, manifest: dict, folder: str | Path | None = None) -> None:
    """Re-attach what a saved run needs at inference beyond its weights: QuaRot's online Hadamard on the
    down_proj inputs, online transforms, the simulated activation and KV-cache quantizers, IntactKV's pivot
    cache (none of them lives in the model's safetensors). ``folder``: the run folder, needed when the run
    has tensors of its own (``runtime.safetensors``: transforms, IntactKV)."""
    rotation = manifest.get("rotation") or {}
    if rotation.get("online_down"):
        attach_online_down_(model, seed=rotation["seed"])
    tensors = {}
    if manifest.get("transform") or manifest.get("intact_kv"):
        if folder is None or not (Path(folder) / RUNTIME_FILE).is_file():
            raise SlimlmError(f"this run's transforms and pivot cache live in its {RUNTIME_FILE}; pass the run "
                              "folder")
        from safetensors.torch import load_file
        tensors = load_file(Path(folder) / RUNTIME_FILE)
    attach_(model, manifest, tensors)
