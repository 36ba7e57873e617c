"""Reading a saved slimlm run (an HF safetensors folder plus ``slimlm.json``) for export, and writing an export
folder atomically. Exports never overwrite: an existing output is an error.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from slimlm.core.files import MANIFEST, read_manifest
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid
from slimlm.runs.save import RECIPE, atomic_dir

logger = logging.getLogger(__name__)


WEIGHTS = "model.safetensors"  # every export writes one safetensors file
EXPORT_RECORD = "slimlm_export.json"  # the source run's manifest and what the export did
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers expects in the header


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_run(run_dir: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor], set[str]]:
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


def linear_weights(manifest: dict, tensors: dict) -> list[str]:
    """Tensor names of the block linears the run compressed (manifest ``layers`` keys + '.weight')."""
    names = [f"{fqn}.weight" for fqn in manifest.get("layers", {})]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SlimlmError(f"the run's safetensors lack {missing[0]} named in {MANIFEST}; was the folder edited?")
    return names


def check_new(out: str | Path, made_by_the_run: tuple[Path, ...] = (), replace_file: bool = False) -> Path:
    """``out`` as a new output: it must not exist (``replace_file``: a .gguf file may, as it is replaced atomically
    once the new one is written), and its folder must (a typo'd folder is refused rather than made), unless the
    folder is one the run itself creates (``made_by_the_run``: the run folder and its parent)."""
    out = Path(out)
    if out.exists() and not (replace_file and out.is_file() and out.suffix == ".gguf"):
        hint = " (slimlm gguf --overwrite replaces a .gguf file)" if out.suffix == ".gguf" else ""
        raise SlimlmError(f"output {out} already exists; outputs are not overwritten: choose a new name{hint}")
    made = any(out.parent == p or p in out.parent.parents for p in made_by_the_run)
    if not out.parent.is_dir() and not made:
        raise SlimlmError(f"cannot write {out}: its folder {out.parent} does not exist")
    return out


def write_export(run: Path, skip: set[str], out: Path, tensors: dict, json_files: dict[str, dict],
                 recipe: str | None = None) -> Path:
    """Atomically write ``tensors`` as one safetensors file, the JSON files, the ``recipe`` text (the pipeline
    including this export; the run's own recipe.yaml lacks it, so it is never copied), and copy the run's other
    files."""
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        if recipe is not None:
            (tmp / RECIPE).write_text(recipe)
        for src in run.iterdir():
            if src.name in skip or src.name in json_files or src.name == RECIPE:
                continue
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / src.name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / WEIGHTS, metadata=SAFETENSORS_METADATA)
        for name, obj in json_files.items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return out


def run_grids(manifest: dict, run: Path) -> dict[str, QuantGrid]:
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


def check_runtime(manifest: dict, fmt: str = "the pack-quantized format") -> None:
    if (manifest.get("rotation") or {}).get("online_down"):
        raise SlimlmError(f"this run needs QuaRot's online down_proj Hadamard at inference, which {fmt} "
                          "cannot carry; export a run without online rotation")
    for key, what in (("transform", "its online input transforms"), ("intact_kv", "IntactKV's pivot cache")):
        if manifest.get(key):
            raise SlimlmError(f"this run needs {what} at inference, which {fmt} cannot carry")
    if manifest.get("kv_cache"):
        logger.warning("the run's simulated %s-bit KV-cache quantization is not exported (weights only)",
                       manifest["kv_cache"]["bits"])
    if manifest.get("abits"):
        logger.warning("the run's simulated %s-bit activation quantization is not exported (weights only)",
                       manifest["abits"])
