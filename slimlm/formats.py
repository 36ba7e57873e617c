"""Exporters from a saved slimlm run (an HF safetensors folder plus ``slimlm.json``) to compact formats.

- ``export_sparse`` / ``load_sparse``: pruned runs. Each block linear becomes a 1-bit keep mask plus its kept
  values (or, for N:M runs, N values and N in-group indices per group of M); everything else is copied as is.
- ``export_compressed_tensors`` / ``load_compressed_tensors``: quantized runs, in compressed-tensors'
  ``pack-quantized`` layout that vLLM and transformers read (``weight_packed`` int32, ``weight_scale``,
  ``weight_zero_point`` for asymmetric grids, ``weight_shape``), with ``quantization_config`` in config.json.

The integer codes are recovered from the saved float weights: slimlm's simulated quantization keeps weights
in float, and its scales (set on pre-GPTQ weights) are not saved, so recomputing them with ``quant_params``
on the saved weights would be wrong. Per (row, group) the scale is the largest step s such that every value
is an integer multiple of s inside the grid's code range, and the stored scale must reproduce every weight
bit for bit (``exact=False``: within SCALE_ULPS ulps, which bf16/fp16 runs need); otherwise SlimlmError.
The exact path is to record scale and zero point at quantize time and export those; until ``quantize``
does, recovery plus verification is the safe substitute.

Exports never overwrite: an existing output folder is an error. Writes are atomic (``export.atomic_dir``).
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from slimlm.errors import SlimlmError
from slimlm.export import MANIFEST, atomic_dir, read_manifest
from slimlm.quant import CODE_DTYPE, QuantGrid, pack_int, unpack_int

logger = logging.getLogger(__name__)

__all__ = ["export_sparse", "load_sparse", "export_compressed_tensors", "load_compressed_tensors",
           "recover_grid", "pack_mask", "unpack_mask"]

WEIGHTS = "model.safetensors"  # every export writes one safetensors file
SPARSE_CONFIG = "sparse_config.json"
EXPORT_RECORD = "slimlm_export.json"  # the source run's manifest and what the export did
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in the header
MAX_CODE_TOLERANCE = 0.25  # |v/s - k| allowed while reading codes back; beyond it rounding is ambiguous
SCALE_ULPS = 2  # the exact scale is searched this many ulps either side of v/k


# ---------------------------------------------------------------- run folders

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_run(run_dir: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor], set[str]]:
    """(folder, manifest, all model tensors, names of the weight files) of a saved slimlm run."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    manifest = read_manifest(run)
    if not manifest:
        raise SlimlmError(f"{run} is not a slimlm run: no {MANIFEST} (save it with slimlm.save first)")
    index = run / f"{WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) + [index.name]
    elif (run / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise SlimlmError(f"{run} has no {WEIGHTS} (or sharded index); only safetensors runs can be exported")
    tensors = {}
    for name in files:
        if name.endswith(".safetensors"):
            tensors |= load_file(run / name)
    return run, manifest, tensors, set(files)


def _linear_weights(manifest: dict, tensors: dict) -> list[str]:
    """Tensor names of the block linears the run compressed (manifest ``layers`` keys + '.weight')."""
    names = [f"{fqn}.weight" for fqn in manifest.get("layers", {})]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SlimlmError(f"the run's safetensors lack {missing[0]} named in {MANIFEST}; was the folder edited?")
    return names


def _check_new(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise SlimlmError(f"output {out} already exists; exports never overwrite, choose a new folder")
    return out


def _write(run: Path, skip: set[str], out: Path, tensors: dict, json_files: dict[str, dict]) -> Path:
    """Atomically write ``tensors`` as one safetensors file, the JSON files, and copy the run's other files."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        for src in run.iterdir():
            if src.name in skip or src.name in json_files:
                continue
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / src.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS, metadata=SAFETENSORS_METADATA)
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- sparse: bitmask and N:M

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)  # MSB first, like np.packbits


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in/8)) uint8, row-major, first column in the most significant bit
    (``np.packbits(mask, axis=1)``); the last byte of a row is zero-padded."""
    bits = F.pad(mask.to(torch.uint8), (0, -mask.shape[-1] % 8)).unflatten(-1, (-1, 8))
    return (bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_mask: the first n bits of each row as bool."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :n].bool()


def _index_bits(m: int) -> int:
    return max(1, (m - 1).bit_length())  # 2 bits for an in-group position of 2:4


def _nm_layout(W: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values (out, in·n/m), packed indices) if every group of m inputs holds at most n nonzeros in the
    original column order, else None. Indices are in-group positions (0..m-1), ascending within a group, packed
    along the row with ``quant.pack_int`` at ceil(log2 m) bits; groups with fewer than n nonzeros (a kept
    weight that is exactly 0) are filled with their first zero positions."""
    out, width = W.shape
    if width % m:
        return None
    groups = W.reshape(out, width // m, m)
    nonzero = groups != 0
    if (nonzero.sum(-1) > n).any():
        return None
    position = torch.arange(m)
    keep = torch.argsort((~nonzero) * m + position, dim=-1)[..., :n].sort(-1).values  # nonzeros first
    values = groups.gather(-1, keep)
    return values.reshape(out, -1), pack_int(keep.reshape(out, -1), _index_bits(m))


def export_sparse(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a pruned run in compact sparse storage; returns ``out_dir``.

    Per block linear ``<fqn>.weight`` of shape (out, in), model dtype, one of two layouts:
    - ``bitmask``: ``<fqn>.weight.bitmask`` uint8 (out, ceil(in/8)) from ``pack_mask`` (1 = nonzero, kept)
      and ``<fqn>.weight.values`` (nnz,), the nonzeros in row-major order;
    - ``nm`` (N:M runs whose rows are N:M in the original column order, i.e. not channel-permuted):
      ``<fqn>.weight.values`` (out, in·N/M) and ``<fqn>.weight.indices`` int32 (out, ceil(in·N/M·b/32)), the
      in-group position (0..M-1) of each value as a b = ceil(log2 M)-bit code packed by ``quant.pack_int``
      (2 bits for 2:4: 1 bit per parameter, as compact as the bitmask, with fixed-width rows).
    Both store ``<fqn>.weight.shape`` (int64 [out, in]). Every other tensor is copied unchanged, as are the
    run's other files; ``sparse_config.json`` records the layout per tensor. Load with ``load_sparse``.
    At 50% unstructured this is 0.5·(value bytes) + 1/8 byte per parameter, e.g. 1.125 B/param in fp16.
    """
    out = _check_new(out_dir)
    run, manifest, tensors, weight_files = _read_run(run_dir)
    if manifest.get("kind") != "prune":
        raise SlimlmError(f"export_sparse needs a prune run; {run} is a '{manifest.get('kind')}' run")
    pattern = manifest.get("pattern", "unstructured")
    nm = tuple(int(x) for x in pattern.split(":")) if ":" in pattern else None
    layers, dense_bytes, sparse_bytes = {}, 0, 0
    for name in _linear_weights(manifest, tensors):
        W = tensors.pop(name)
        packed = _nm_layout(W, *nm) if nm else None
        if packed is not None:
            parts = {"values": packed[0], "indices": packed[1]}
            layers[name] = {"layout": "nm", "n": nm[0], "m": nm[1], "index_bits": _index_bits(nm[1])}
        else:
            mask = W != 0
            parts = {"bitmask": pack_mask(mask), "values": W[mask]}
            layers[name] = {"layout": "bitmask"}
            if nm:
                logger.info("%s is not %s in its original column order (channel-permuted?): bitmask", name, pattern)
        parts["shape"] = torch.tensor(W.shape, dtype=torch.int64)
        layers[name] |= {"shape": list(W.shape), "dtype": _dtype_name(W.dtype)}
        tensors |= {f"{name}.{key}": t for key, t in parts.items()}
        dense_bytes += W.numel() * W.element_size()
        sparse_bytes += sum(t.numel() * t.element_size() for t in parts.values())
    config = {"format": "slimlm-sparse", "version": 1, "bitorder": "big", "layers": layers,
              "linear_dense_bytes": dense_bytes, "linear_sparse_bytes": sparse_bytes}
    record = {"format": "slimlm-sparse", "source": str(run), "manifest": manifest}
    return _write(run, weight_files | {MANIFEST}, out, tensors, {SPARSE_CONFIG: config, EXPORT_RECORD: record})


def load_sparse(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of an ``export_sparse`` folder, bit for bit (load it with model.load_state_dict)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / SPARSE_CONFIG).is_file():
        raise SlimlmError(f"{folder} has no {SPARSE_CONFIG}; it was not written by export_sparse")
    layers = json.loads((folder / SPARSE_CONFIG).read_text())["layers"]
    tensors = load_file(folder / WEIGHTS)
    state = {}
    for name, info in layers.items():
        shape = torch.Size(tensors.pop(f"{name}.shape").tolist())
        values = tensors.pop(f"{name}.values")
        W = torch.zeros(shape, dtype=values.dtype)
        if info["layout"] == "nm":
            n_kept = shape[1] // info["m"] * info["n"]
            idx = unpack_int(tensors.pop(f"{name}.indices"), info["index_bits"], n_kept).long()
            idx = idx.reshape(shape[0], -1, info["n"])
            W.view(shape[0], -1, info["m"]).scatter_(-1, idx, values.reshape(idx.shape))
        else:
            W[unpack_mask(tensors.pop(f"{name}.bitmask"), shape[1])] = values
        state[name] = W
    return tensors | state


# ---------------------------------------------------------------- codes back from float weights

def _fits(k: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """Whether each row of signed multiples k fits the grid: sym codes k in [qmin, qmax]; asym codes
    k + z in [0, 2^b - 1] for z = max(0, -min k)."""
    lo, hi = k.amin(-1), k.amax(-1)
    if grid.symmetric:
        return (lo >= grid.qmin) & (hi <= grid.qmax)
    return hi + (-lo).clamp(min=0) <= grid.qmax


def _best_scale(v: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the scale s in v's dtype near v/k that makes fl(k·s) closest to v (how compressed-tensors
    dequantizes: codes cast to the scale's dtype, times the scale), and that largest error max|fl(k·s) - v|
    relative to max|v| (0 where s reproduces v exactly)."""
    ref = k.abs().argmax(-1, keepdim=True)  # the largest multiple pins s down best
    s0 = (v.gather(-1, ref).double() / k.gather(-1, ref)).to(v.dtype).squeeze(-1)
    kd, v64 = k.to(v.dtype), v.double()
    best, err = s0, torch.full(s0.shape, math.inf, dtype=torch.float64)
    up, down = s0, s0
    for step in range(SCALE_ULPS + 1):
        for s in (up, down) if step else (s0,):
            e = ((kd * s.unsqueeze(-1)).double() - v64).abs().amax(-1)
            better = e < err
            best, err = torch.where(better, s, best), torch.where(better, e, err)
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.zeros_like(down))
    return best, err / v64.abs().amax(-1)


def recover_grid(W: torch.Tensor, grid: QuantGrid, name: str = "weight", exact: bool = True):
    """Integer codes, scale and zero point of a weight that lies on ``grid``, read back from its values.

    Returns ``codes`` (CODE_DTYPE, shape of W; signed for symmetric grids, [0, 2^b-1] otherwise), ``scale``
    (W's dtype, (out, ngroups)), ``zero`` (int64, (out, ngroups); zeros when symmetric) and the largest
    relative error of ``(codes - zero).to(W.dtype) * scale`` against W (0.0: bit for bit).

    Per (row, group) with d = min |w| over nonzero w: for j = 1, 2, ... the first step s = d/j (d is j·s)
    with every w/s an integer (within the dtype's rounding), inside the code range, and with a scale in W's
    dtype reproducing the group: the largest valid step. Small codes are common, so j stays small.
    Any such representation decompresses to the same weights; it need not be the one quantization used.

    ``exact=False`` accepts a group reproduced within SCALE_ULPS ulps instead of bit for bit. Half-precision
    runs need it: slimlm's scales are fp32, the weights fp32 grid values rounded once to bf16/fp16, and a
    bf16/fp16 scale (as compressed-tensors stores it) usually cannot reproduce that rounding for every code.
    SlimlmError if a group has no representation (the weights are not on a ``grid.bits`` uniform grid).
    """
    out, n = W.shape
    gs = grid.group_size or n
    ngroups = math.ceil(n / gs)
    V = F.pad(W, (0, ngroups * gs - n)).reshape(out, ngroups, gs)
    V64 = V.double()
    d = V64.abs().masked_fill(V64 == 0, math.inf).amin(-1)  # smallest nonzero magnitude; inf if none
    kmax = max(-grid.qmin, grid.qmax)
    eps = torch.finfo(W.dtype).eps
    tol = 2 * kmax * eps
    if tol > MAX_CODE_TOLERANCE:
        raise SlimlmError(f"{grid.bits}-bit codes cannot be read back reliably from {_dtype_name(W.dtype)} "
                          "weights; export from a float32 run (or record scales at quantize time)")
    K = torch.zeros(out, ngroups, gs, dtype=torch.int64)
    scale = torch.ones(out, ngroups, dtype=W.dtype)  # all-zero groups: scale 1, codes 0 (as quant_params)
    error = torch.zeros(out, ngroups, dtype=torch.float64)
    done, on_grid = torch.isinf(d), torch.isinf(d)
    for j in range(1, kmax + 1):
        todo = (~done).nonzero(as_tuple=True)
        if not todo[0].numel():
            break
        r = V64[todo] / (d[todo] / j).unsqueeze(-1)
        k = r.round()
        ok = ((r - k).abs() <= tol).all(-1) & _fits(k, grid)
        on_grid[todo] |= ok
        s, e = _best_scale(V[todo], k)
        ok &= e == 0 if exact else e <= SCALE_ULPS * eps
        hit = tuple(t[ok] for t in todo)
        K[hit], scale[hit], error[hit], done[hit] = k[ok].long(), s[ok], e[ok], True
    if not done.all():
        row, group = (~done).nonzero()[0].tolist()
        where = f"{int((~done).sum())} of {done.numel()} groups, first row {row} group {group}"
        if on_grid[~done].all():
            raise SlimlmError(f"{name} is on a {grid.bits}-bit grid only up to {_dtype_name(W.dtype)} rounding "
                              f"({where}); pass exact=False to store the nearest {_dtype_name(W.dtype)} scales")
        raise SlimlmError(f"{name} is not on a {grid.bits}-bit uniform grid ({where}); was the run edited or "
                          "fine-tuned after quantization?")
    zero = torch.zeros_like(done, dtype=torch.int64) if grid.symmetric else (-K.amin(-1)).clamp(min=0)
    codes = (K + zero.unsqueeze(-1)).reshape(out, -1)[:, :n]
    return codes.to(CODE_DTYPE), scale, zero, error.max().item()


# ---------------------------------------------------------------- compressed-tensors pack-quantized

def _grids(manifest: dict, run: Path) -> dict[str, QuantGrid]:
    """FQN -> weight grid from a quantize run (per-layer bits) or a prune run with ``quantization``."""
    kind = manifest.get("kind")
    if kind == "quantize":
        return {fqn: QuantGrid(rec["bits"], manifest["symmetric"], manifest["group_size"])
                for fqn, rec in manifest["layers"].items()}
    q = manifest.get("quantization")
    if kind == "prune" and q:
        return {fqn: QuantGrid(q["wbits"], q["symmetric"], q["group_size"]) for fqn in manifest["layers"]}
    raise SlimlmError(f"{run} is a '{kind}' run without weight quantization; export_compressed_tensors needs a "
                      "quantize run (or prune with wbits); use export_sparse for pruned weights")


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


def _check_runtime(manifest: dict, fmt: str = "the pack-quantized format") -> None:
    if (manifest.get("rotation") or {}).get("online_down"):
        raise SlimlmError(f"this run needs QuaRot's online down_proj Hadamard at inference, which {fmt} "
                          "cannot carry; export a run without online rotation")
    if manifest.get("abits"):
        logger.warning("the run's simulated %s-bit activation quantization is not exported (weights only)",
                       manifest["abits"])


def _warn_unfused(schemes: dict[str, dict]) -> None:
    """vLLM fuses q/k/v and gate/up into one linear, which must share one scheme (field.md §0 fact 10)."""
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


def export_compressed_tensors(run_dir: str | Path, out_dir: str | Path, exact: bool = True) -> Path:
    """Write a quantized run in compressed-tensors' ``pack-quantized`` format; returns ``out_dir``.

    Per quantized linear ``<fqn>`` with weight (out, in) on a b-bit grid, replacing ``<fqn>.weight``:
    - ``weight_packed`` int32 (out, ceil(in·b/32)): codes packed densely along the input dim, little-endian
      bit stream (``quant.pack_int``). Codes are in compressed-tensors' signed range [-2^(b-1), 2^(b-1)-1]
      for both grids and stored offset by 2^(b-1); for asymmetric grids that is slimlm's unsigned code.
    - ``weight_scale`` (out, ngroups) in the model dtype (ngroups = 1 for per-channel grids);
    - ``weight_zero_point`` (asymmetric only) int32 (ceil(out·b/32), ngroups): zero points in the same signed
      convention, packed along the output dim;
    - ``weight_shape`` int64 [out, in].
    Weights decompress as (codes - zero) · scale in the scale's dtype. config.json gains
    ``quantization_config`` (quant_method compressed-tensors, format pack-quantized, status compressed):
    one config group targeting ``Linear`` with every unquantized Linear (lm_head) in ``ignore``, or, with
    several schemes (per-layer bits), one group per scheme listing its module names.
    Codes come from ``recover_grid`` (see the module docstring) and every layer is checked to decompress to
    its saved weights exactly; ``exact=False`` (needed for most bf16/fp16 runs) allows SCALE_ULPS ulps and
    records the largest relative error in slimlm_export.json. Load with ``load_compressed_tensors`` or any
    compressed-tensors reader; vLLM's int kernels take 4- and 8-bit weights only, and q/k/v (gate/up) must
    share a scheme since vLLM fuses them (both are warned about).
    """
    out = _check_new(out_dir)
    run, manifest, tensors, weight_files = _read_run(run_dir)
    grids = _grids(manifest, run)
    _check_runtime(manifest)
    schemes, names = {}, _linear_weights(manifest, tensors)
    for name in names:  # validate every layer before the slow part
        schemes[name.removesuffix(".weight")] = _scheme(grids[name.removesuffix(".weight")],
                                                        tensors[name].shape[1], name)
    _warn_unfused(schemes)
    odd = sorted({s["num_bits"] for s in schemes.values()} - {4, 8})
    if odd:
        logger.warning("%s-bit layers: transformers/compressed-tensors can load them, vLLM's kernels cannot "
                       "(4 and 8 bits only)", odd)
    max_error = 0.0
    for name in names:
        fqn = name.removesuffix(".weight")
        W, grid = tensors.pop(name), grids[fqn]
        if schemes[fqn]["strategy"] == "channel":
            grid = QuantGrid(grid.bits, grid.symmetric, None)
        codes, scale, zero, error = recover_grid(W, grid, name, exact)
        max_error = max(max_error, error)
        tensors[f"{fqn}.weight_packed"] = pack_int(codes, grid.bits, signed=grid.symmetric)
        tensors[f"{fqn}.weight_scale"] = scale
        if not grid.symmetric:
            tensors[f"{fqn}.weight_zero_point"] = pack_int(zero.T, grid.bits).T.contiguous()
        tensors[f"{fqn}.weight_shape"] = torch.tensor(W.shape, dtype=torch.int64)
        back = _decompress(tensors, fqn, schemes[fqn])
        if not (torch.equal(back, W) if error == 0 else torch.allclose(back, W, rtol=0, atol=_atol(W, error))):
            raise SlimlmError(f"internal error: {name} does not round-trip through pack-quantized")
    config = json.loads((run / "config.json").read_text())
    config["quantization_config"] = _quantization_config(schemes, _linear_names(run))
    record = {"format": "compressed-tensors/pack-quantized", "source": str(run), "exact": max_error == 0,
              "max_relative_error": max_error, "manifest": manifest}
    return _write(run, weight_files | {MANIFEST}, out, tensors, {"config.json": config, EXPORT_RECORD: record})


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
