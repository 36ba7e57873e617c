"""Safetensors checkpoints read tensor by tensor, and checked before any long work.

Validation reads only the shard headers (safetensors' ``safe_open``) and compares every tensor's shape with the
model built from its config on the meta device, so a missing shard or tensor, a corrupt header or a shape
mismatch is one line before anything long starts. ``read_tensors`` reads chosen tensors shard by shard
(``--offload disk`` streams blocks with it, see ``slimlm.runs.offload``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from slimlm.core.architectures import adapter_for
from slimlm.errors import SlimlmError


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TensorIndex = dict[str, tuple[Path, tuple[int, ...]]]  # tensor name -> (shard file, shape)


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX).is_file() or (folder / SINGLE).is_file()


def tensor_index(folder: str | Path) -> TensorIndex:
    """Every tensor's shard and shape, from the shard headers (an index json, or one model.safetensors)."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            shards = sorted({folder / f for f in json.loads((folder / INDEX).read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise SlimlmError(f"{folder / INDEX} is not a safetensors shard index ({e})") from e
    elif (folder / SINGLE).is_file():
        shards = [folder / SINGLE]
    else:
        raise SlimlmError(f"{folder} has no safetensors weights ({SINGLE} or {INDEX})")
    index = {}
    for shard in shards:
        if not shard.is_file():
            raise SlimlmError(f"shard {shard.name} named by {INDEX} is missing from {folder}")
        try:
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    index[name] = (shard, tuple(f.get_slice(name).get_shape()))
        except (SafetensorError, OSError) as e:
            raise SlimlmError(f"cannot read safetensors shard {shard}: {e}") from e
    return index


def expected_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` holds: its state dict without tied copies (the LM head
    tied to the embeddings is saved once, under the embeddings' name)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {name: t for name, t in model.state_dict().items() if name not in tied}


def check_shapes(model: nn.Module, index: TensorIndex, complete: bool = True) -> None:
    """Each tensor of ``model`` must be in ``index`` with the same shape; with ``complete=False`` only the
    tensors present are compared (transformers handles renamed or missing keys itself)."""
    for name, tensor in expected_tensors(model).items():
        if name not in index:
            if complete:
                raise SlimlmError(f"tensor {name} is missing from the safetensors shards")
            continue
        shard, shape = index[name]
        if shape != tuple(tensor.shape):
            raise SlimlmError(f"tensor {name} has shape {list(shape)} in {shard.name}, "
                              f"but the model's config gives {list(tensor.shape)}")


def skeleton(folder: str | Path, dtype: torch.dtype = torch.float32, structure: dict | None = None) -> nn.Module:
    """The model built from ``folder/config.json`` (and a structured run's recorded ``structure``,
    ``core.structure``) with every parameter on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from slimlm.core.structure import build

    try:
        config = AutoConfig.from_pretrained(folder)
        with init_empty_weights():
            model = build(config, structure or {}, dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimlmError(f"cannot read the config of {folder}: {first}") from e
    adapter_for(model)  # unknown architectures fail here
    return model.eval()


def read_tensors(index: TensorIndex, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors ``{key: index name}`` read shard by shard. safetensors maps the shard privately (copy on
    write): pages are read when first touched, an in-place change never reaches the source file, and the
    mapping goes away with the last tensor that uses it."""
    by_shard: dict[Path, list[tuple[str, str]]] = {}
    for key, name in names.items():
        by_shard.setdefault(index[name][0], []).append((key, name))
    out = {}
    for shard, group in by_shard.items():
        with safe_open(shard, "pt") as f:
            for key, name in group:
                tensor = f.get_tensor(name)
                out[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def check_folder(folder: Path, allow_pickle: bool) -> None:
    """Before loading a local folder: pickled weights (``*.bin``, which can run code when unpickled) only
    with ``allow_pickle``; every safetensors shard present with a readable header, and no tensor shaped
    differently from what the config gives (with the shapes a structured run's manifest records,
    ``core.structure``). Each problem is one line instead of a traceback."""
    from slimlm.core.files import read_manifest

    if not has_safetensors(folder):
        if not allow_pickle and any(folder.glob("*.bin")):
            raise SlimlmError(f"{folder} holds only pickled weights (*.bin), which can run code when loaded; "
                              "pass --allow-pickle if you trust them")
        return  # no weights at all: transformers says so
    index = tensor_index(folder)
    try:
        quantized = "quantization_config" in json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{folder / 'config.json'} is not valid JSON: {e}") from e
    if not quantized:  # packed quantized tensors legitimately differ from the float skeleton's shapes
        model = skeleton(folder, structure=read_manifest(folder).get("structure"))
        check_shapes(model, index, complete=False)
