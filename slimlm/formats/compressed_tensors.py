"""Quantized runs in compressed-tensors' ``pack-quantized`` layout, which vLLM and transformers read
(``weight_packed`` int32, ``weight_scale``, ``weight_zero_point`` for asymmetric grids, ``weight_shape``), with
``quantization_config`` in config.json (``export_compressed_tensors``, ``load_compressed_tensors``). Codes come
from ``formats.codes.recover_grid``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from slimlm.core.linalg import small_op_threads
from slimlm.errors import SlimlmError
from slimlm.formats.codes import recover_grid
from slimlm.formats.source import (EXPORT_RECORD, WEIGHTS, check_new, check_runtime, linear_weights, read_run,
                                   run_grids, write_export)
from slimlm.core.files import MANIFEST
from slimlm.quant.grids import QuantGrid
from slimlm.quant.packing import pack_int, unpack_int

logger = logging.getLogger(__name__)


def _scheme(grid: QuantGrid, width: int, name: str) -> dict:
    """compressed-tensors ``weights`` args. One group spanning the row is the channel strategy; otherwise
    the group size must divide the width (compressed-tensors has no partial last group)."""
    if grid.group_size is None or grid.group_size >= width:
        strategy = {"strategy": "channel", "group_size": None}
    elif width % grid.group_size == 0:
        strategy = {"strategy": "group", "group_size": grid.group_size}
    else:
        raise SlimlmError(f"{name}: group_size {grid.group_size} does not divide its {width} inputs, which "
                          "compressed-tensors cannot store; quantize with a group size that divides every width")
    return {"num_bits": grid.bits, "type": "int", "symmetric": grid.symmetric, **strategy,
            "dynamic": False, "actorder": None}


def _linear_names(run: Path) -> list[str]:
    """FQNs of every nn.Linear in the run's architecture (model built on the meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run))
    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _warn_unfused(schemes: dict[str, dict]) -> None:
    """vLLM fuses q/k/v and gate/up into one linear, which must share one scheme (why AutoRound has
    ``shared_layers``: intel/auto-round docs/step_by_step.md, §AutoScheme)."""
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        by_parent = {}
        for fqn, scheme in schemes.items():
            parent, _, leaf = fqn.rpartition(".")
            if leaf in fused:
                by_parent.setdefault(parent, set()).add(json.dumps(scheme, sort_keys=True))
        mixed = [p for p, s in by_parent.items() if len(s) > 1]
        if mixed:
            logger.warning("%s: %s get different bit-widths; vLLM fuses them and will refuse to load",
                           mixed[0], "/".join(fused))


def export_compressed_tensors(run_dir: str | Path, out_dir: str | Path, exact: bool = True,
                              recipe: str | None = None, progress: bool = True) -> Path:
    """Write a quantized run in compressed-tensors' ``pack-quantized`` format; returns ``out_dir``.

    Per quantized linear ``<fqn>`` with weight (out, in) on a b-bit grid, replacing ``<fqn>.weight``:
    - ``weight_packed`` int32 (out, ceil(in·b/32)): codes packed densely along the input dim, little-endian
      bit stream (``quant.packing.pack_int``). Codes are in compressed-tensors' signed range [-2^(b-1), 2^(b-1)-1]
      for both grids and stored offset by 2^(b-1); for asymmetric grids that is slimlm's unsigned code.
    - ``weight_scale`` (out, ngroups) in the model dtype (ngroups = 1 for per-channel grids);
    - ``weight_zero_point`` (asymmetric only) int32 (ceil(out·b/32), ngroups): zero points in the same signed
      convention, packed along the output dim;
    - ``weight_shape`` int64 [out, in].
    Weights decompress as (codes - zero) · scale in the scale's dtype. config.json gains
    ``quantization_config`` (quant_method compressed-tensors, format pack-quantized, status compressed):
    one config group targeting ``Linear`` with every unquantized Linear (lm_head) in ``ignore``, or, with
    several schemes (per-layer bits), one group per scheme listing its module names.
    Codes come from ``formats.codes.recover_grid`` (see its module docstring) and every layer is checked to decompress to
    its saved weights exactly; ``exact=False`` (needed for most bf16/fp16 runs) allows SCALE_ULPS ulps and
    records the largest relative error in slimlm_export.json; ``recipe`` is written as recipe.yaml. Load with
    ``load_compressed_tensors`` or any compressed-tensors reader; vLLM's int kernels take 4- and 8-bit weights
    only, and q/k/v (gate/up) must share a scheme since vLLM fuses them (both are warned about). ``progress``
    shows a bar over the linears.
    """
    out = check_new(out_dir)
    run, manifest, tensors, weight_files = read_run(run_dir)
    grids = run_grids(manifest, run)
    check_runtime(manifest)
    schemes, names = {}, linear_weights(manifest, tensors)
    for name in names:  # validate every layer before the slow part
        schemes[name.removesuffix(".weight")] = _scheme(grids[name.removesuffix(".weight")],
                                                        tensors[name].shape[1], name)
    _warn_unfused(schemes)
    odd = sorted({s["num_bits"] for s in schemes.values()} - {4, 8})
    if odd:
        logger.warning("%s-bit layers: transformers/compressed-tensors can load them, vLLM's kernels cannot "
                       "(4 and 8 bits only)", odd)
    max_error = 0.0
    for name in tqdm(names, desc="compressed-tensors", disable=not progress):
        fqn = name.removesuffix(".weight")
        W, grid = tensors.pop(name), grids[fqn]
        if schemes[fqn]["strategy"] == "channel":
            grid = QuantGrid(grid.bits, grid.symmetric, None)
        with small_op_threads(W.numel()):  # many elementwise passes over one weight
            codes, scale, zero, error = recover_grid(W, grid, name, exact)
            tensors[f"{fqn}.weight_packed"] = pack_int(codes, grid.bits, signed=grid.symmetric)
            tensors[f"{fqn}.weight_scale"] = scale
            if not grid.symmetric:
                tensors[f"{fqn}.weight_zero_point"] = pack_int(zero.T, grid.bits).T.contiguous()
            tensors[f"{fqn}.weight_shape"] = torch.tensor(W.shape, dtype=torch.int64)
            back = _decompress(tensors, fqn, schemes[fqn])
        max_error = max(max_error, error)
        if not (torch.equal(back, W) if error == 0 else torch.allclose(back, W, rtol=0, atol=_atol(W, error))):
            raise SlimlmError(f"internal error: {name} does not round-trip through pack-quantized")
    config = json.loads((run / "config.json").read_text())
    config["quantization_config"] = _quantization_config(schemes, _linear_names(run))
    record = {"format": "compressed-tensors/pack-quantized", "source": str(run), "exact": max_error == 0,
              "max_relative_error": max_error, "manifest": manifest}
    return write_export(run, weight_files | {MANIFEST}, out, tensors, {"config.json": config, EXPORT_RECORD: record},
                        recipe)


def _atol(W: torch.Tensor, relative: float) -> float:
    return 2 * relative * W.abs().max().item()  # loose bound: relative error is per group, this is global


def _quantization_config(schemes: dict[str, dict], linears: list[str]) -> dict:
    distinct = sorted({json.dumps(s, sort_keys=True) for s in schemes.values()})
    ignore = sorted(set(linears) - set(schemes))
    groups = {}
    for i, key in enumerate(distinct):
        targets = ["Linear"] if len(distinct) == 1 else sorted(f for f, s in schemes.items()
                                                                if json.dumps(s, sort_keys=True) == key)
        groups[f"group_{i}"] = {"targets": targets, "weights": json.loads(key), "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def _decompress(tensors: dict, fqn: str, weights: dict) -> torch.Tensor:
    """One linear's weight from its pack-quantized tensors (compressed-tensors' arithmetic)."""
    bits, sym = weights["num_bits"], weights["symmetric"]
    out, n = tensors[f"{fqn}.weight_shape"].tolist()
    scale = tensors[f"{fqn}.weight_scale"]
    gs = weights["group_size"] or n
    codes = unpack_int(tensors[f"{fqn}.weight_packed"], bits, n, signed=True)  # compressed-tensors' signed codes
    zero = 0
    if not sym:
        zero = unpack_int(tensors[f"{fqn}.weight_zero_point"].T, bits, out, signed=True).T
        zero = zero.repeat_interleave(gs, -1)[:, :n].to(scale.dtype)
    return (codes.to(scale.dtype) - zero) * scale.repeat_interleave(gs, -1)[:, :n]


def load_compressed_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a pack-quantized folder written by ``export_compressed_tensors``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("format") != "pack-quantized":
        raise SlimlmError(f"{folder} is not a pack-quantized compressed-tensors folder")
    tensors = load_file(folder / WEIGHTS)
    fqns = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    by_name = {t: g["weights"] for g in qc["config_groups"].values() for t in g["targets"]}
    state = {}
    for fqn in fqns:
        state[f"{fqn}.weight"] = _decompress(tensors, fqn, by_name.get(fqn) or by_name["Linear"])
    suffixes = (".weight_packed", ".weight_scale", ".weight_zero_point", ".weight_shape")
    return {k: v for k, v in tensors.items() if not k.endswith(suffixes)} | state
