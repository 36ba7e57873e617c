"""Compact sparse storage of a pruned run: per block linear a 1-bit keep mask plus its kept values, or, for N:M
runs, N values and N in-group indices per group of M; everything else is copied as is (``export_sparse``,
``load_sparse``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.core.linalg import small_op_threads
from slimlm.errors import SlimlmError
from slimlm.formats.source import (EXPORT_RECORD, WEIGHTS, check_new, dtype_name, linear_weights, read_run,
                                   write_export)
from slimlm.core.files import MANIFEST
from slimlm.quant.packing import pack_int, unpack_int

logger = logging.getLogger(__name__)


SPARSE_CONFIG = "sparse_config.json"
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
    along the row with ``quant.packing.pack_int`` at ceil(log2 m) bits; groups with fewer than n nonzeros (a kept
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


def export_sparse(run_dir: str | Path, out_dir: str | Path, recipe: str | None = None,
                  progress: bool = True) -> Path:
    """Write a pruned run in compact sparse storage; returns ``out_dir``.

    Per block linear ``<fqn>.weight`` of shape (out, in), model dtype, one of two layouts:
    - ``bitmask``: ``<fqn>.weight.bitmask`` uint8 (out, ceil(in/8)) from ``pack_mask`` (1 = nonzero, kept)
      and ``<fqn>.weight.values`` (nnz,), the nonzeros in row-major order;
    - ``nm`` (N:M runs whose rows are N:M in the original column order, i.e. not channel-permuted):
      ``<fqn>.weight.values`` (out, in·N/M) and ``<fqn>.weight.indices`` int32 (out, ceil(in·N/M·b/32)), the
      in-group position (0..M-1) of each value as a b = ceil(log2 M)-bit code packed by ``quant.packing.pack_int``
      (2 bits for 2:4: 1 bit per parameter, as compact as the bitmask, with fixed-width rows).
    Both store ``<fqn>.weight.shape`` (int64 [out, in]). Every other tensor is copied unchanged, as are the
    run's other files; ``sparse_config.json`` records the layout per tensor; ``recipe`` is written as recipe.yaml.
    Load with ``load_sparse``.
    At 50% unstructured this is 0.5·(value bytes) + 1/8 byte per parameter, e.g. 1.125 B/param in fp16.
    ``progress`` shows a bar over the linears.
    """
    out = check_new(out_dir)
    run, manifest, tensors, weight_files = read_run(run_dir)
    if manifest.get("kind") != "prune":
        raise SlimlmError(f"export_sparse needs a prune run; {run} is a '{manifest.get('kind')}' run")
    pattern = manifest.get("pattern", "unstructured")
    nm = tuple(int(x) for x in pattern.split(":")) if ":" in pattern else None
    layers, dense_bytes, sparse_bytes = {}, 0, 0
    for name in tqdm(linear_weights(manifest, tensors), desc="sparse", disable=not progress):
        W = tensors.pop(name)
        with small_op_threads(W.numel()):  # a few elementwise passes over one weight
            packed = _nm_layout(W, *nm) if nm else None
            if packed is not None:
                parts = {"values": packed[0], "indices": packed[1]}
                layers[name] = {"layout": "nm", "n": nm[0], "m": nm[1], "index_bits": _index_bits(nm[1])}
            else:
                mask = W != 0
                parts = {"bitmask": pack_mask(mask), "values": W[mask]}
                layers[name] = {"layout": "bitmask"}
                if nm:
                    logger.info("%s is not %s in its original column order (channel-permuted?): bitmask", name,
                                pattern)
        parts["shape"] = torch.tensor(W.shape, dtype=torch.int64)
        layers[name] |= {"shape": list(W.shape), "dtype": dtype_name(W.dtype)}
        tensors |= {f"{name}.{key}": t for key, t in parts.items()}
        dense_bytes += W.numel() * W.element_size()
        sparse_bytes += sum(t.numel() * t.element_size() for t in parts.values())
    config = {"format": "slimlm-sparse", "version": 1, "bitorder": "big", "layers": layers,
              "linear_dense_bytes": dense_bytes, "linear_sparse_bytes": sparse_bytes}
    record = {"format": "slimlm-sparse", "source": str(run), "manifest": manifest}
    return write_export(run, weight_files | {MANIFEST}, out, tensors, {SPARSE_CONFIG: config, EXPORT_RECORD: record},
                        recipe)


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
