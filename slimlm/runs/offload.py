"""``--offload disk``: compress a model larger than memory, one block at a time from and to safetensors shards.

``--offload disk`` keeps the model as that meta skeleton (accelerate's ``init_empty_weights``: parameters
take no memory, buffers such as the rotary frequencies are real) and loads only the tensors outside the
decoder blocks (embeddings, final norm, LM head). The engine asks ``ShardStream.load`` for block i just
before it runs, which reads only that block's tensors from the source shards, and hands the compressed
block to ``ShardStream.store``, which writes it as its own output shard and frees it back to meta. Peak
memory is about one block plus its compression temporaries, the outside tensors and the calibration
activations, whatever the model's depth. ``save_streamed`` then adds the outside tensors' shard, the
shard index, config and tokenizer, so plain transformers reloads the result.
"""
from __future__ import annotations

import ctypes
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.core import distributed
from slimlm.core.architectures import adapter_for, decoder_blocks
from slimlm.core.files import read_manifest
from slimlm.core.models import DTYPES
from slimlm.core.shards import INDEX, TensorIndex, check_shapes, expected_tensors, has_safetensors, read_tensors, skeleton, tensor_index
from slimlm.errors import SlimlmError
from slimlm.runs.resume import clear_checkpoint, write_tensors
from slimlm.runs.save import replace_dir, write_manifest


@dataclass
class ShardStream:
    """The engine's ``BlockIO`` over safetensors shards: block i comes from the source shards and goes to
    ``folder/model-<i+1>-of-<n+1>.safetensors``; the last shard holds the tensors outside the blocks."""

    index: TensorIndex
    prefix: str  # the blocks' path, e.g. "model.layers"
    nblocks: int
    dtype: torch.dtype
    folder: Path  # the run's partial folder

    def shard_name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.nblocks + 1:05d}.safetensors"

    def load(self, i: int, block: nn.Module) -> None:
        names = {key: f"{self.prefix}.{i}.{key}" for key in block.state_dict()}
        block.load_state_dict(read_tensors(self.index, names, self.dtype), strict=True, assign=True)

    def store(self, i: int, block: nn.Module) -> None:
        if distributed.is_main():  # under torchrun every rank holds the same compressed block; one writes it
            tensors = {f"{self.prefix}.{i}.{key}": t for key, t in block.state_dict().items()}
            self.folder.mkdir(parents=True, exist_ok=True)
            write_tensors(tensors, self.folder / self.shard_name(i), metadata={"format": "pt"})
        block.to("meta")  # frees the weights; the shard on disk is the block now
        _trim_heap()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``). Without it, the heap that a block's
    compression temporaries fragmented stays resident and RSS creeps up block after block (measured on a
    24-block model with 50 MB blocks: +22 MB per block; flat with the trim)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; elsewhere nothing to do
    if trim is not None:
        trim(0)


def load_streamed(name: str, dtype: str, folder: Path):
    """``(model, tokenizer, ShardStream)`` for ``--offload disk``: everything validated first (config,
    every shard header, every tensor's presence and shape), then only the tensors outside the blocks
    loaded; the stream writes its output shards into ``folder``."""
    from transformers import AutoTokenizer

    source = Path(name)
    if not (source / "config.json").is_file() or not has_safetensors(source):
        raise SlimlmError(f"--offload disk reads a local Hugging Face folder of safetensors shards; "
                          f"{name} is not one")
    if dtype not in DTYPES:
        raise SlimlmError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    model = skeleton(source, DTYPES[dtype], read_manifest(source).get("structure"))  # structured runs too
    index = tensor_index(source)
    check_shapes(model, index)
    prefix = adapter_for(model).blocks
    outside = [n for n in expected_tensors(model) if not n.startswith(prefix + ".")]
    model.load_state_dict(read_tensors(index, {n: n for n in outside}, DTYPES[dtype]), strict=False, assign=True)
    model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SlimlmError(f"cannot load the tokenizer of {name}: {str(e).strip().splitlines()[0]}") from e
    return model, tokenizer, ShardStream(index, prefix, len(decoder_blocks(model)), DTYPES[dtype], folder)


def check_free_space(model: nn.Module, stream: ShardStream) -> None:
    """Fail before any work when the output shards cannot fit on the disk (already written shards count)."""
    needed = sum(t.numel() * t.element_size() for t in expected_tensors(model).values())
    written = sum(f.stat().st_size for f in stream.folder.glob("model-*.safetensors"))
    stream.folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(stream.folder.parent).free
    if needed - written > free:
        raise SlimlmError(f"the output needs about {(needed - written) / 1e9:.1f} GB and only {free / 1e9:.1f} GB "
                          f"are free in {stream.folder.parent}")


def save_streamed(model: nn.Module, tokenizer, stream: ShardStream, out: Path, manifest: dict,
                  tensors: dict[str, dict[str, torch.Tensor]] | None = None, overwrite: bool = False,
                  files: dict[str, str] | None = None) -> Path:
    """Complete the partial folder (outside tensors' shard, shard index, config, tokenizer, extra tensor
    and text files, then the manifest) and rename it to ``out``."""
    folder, prefix = stream.folder, stream.prefix + "."
    names = expected_tensors(model)
    outside = {n: t for n, t in names.items() if not n.startswith(prefix)}
    write_tensors(outside, folder / stream.shard_name(stream.nblocks), metadata={"format": "pt"})
    weight_map = {n: stream.shard_name(int(n[len(prefix):].split(".")[0]) if n.startswith(prefix)
                                       else stream.nblocks) for n in names}
    total = sum(t.numel() * t.element_size() for t in names.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for file_name, group in (tensors or {}).items():
        write_tensors(group, folder / file_name)
    for file_name, text in (files or {}).items():
        (folder / file_name).write_text(text)
    clear_checkpoint(folder)
    write_manifest(folder, manifest)
    replace_dir(folder, out)
    return out
