"""Writing results: an HF ``save_pretrained`` folder (safetensors) plus the ``slimlm.json`` manifest.

Writes are atomic: everything goes to a temporary folder beside the target, which is renamed into
place only when complete, so an interrupted run never leaves a folder that looks finished.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from slimlm.core.files import MANIFEST, follow_umask
from slimlm.errors import SlimlmError

RECIPE = "recipe.yaml"  # the pipeline that made the run (slimlm.recipe), replayed by `slimlm run`


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """Fail before any long work if ``out`` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimlmError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise SlimlmError(f"refusing to overwrite {out}: it is not a slimlm run folder")
    return out


def versions() -> dict:
    import transformers

    from slimlm.version import __version__
    return {"slimlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on any error it vanishes.

    With ``overwrite``, the old ``out`` is swapped aside first and deleted only after the new one is in place.
    """
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | Path, out: str | Path) -> None:
    """Rename the finished folder ``tmp`` to ``out`` (its modes made to follow the umask); an existing ``out``
    is swapped aside first and deleted only once the new one is in place."""
    tmp, out = Path(tmp), Path(out)
    follow_umask(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def save_run(model, tokenizer, out: str | Path, manifest: dict, overwrite: bool = False,
             tensors: dict[str, dict[str, torch.Tensor]] | None = None, files: dict[str, str] | None = None) -> Path:
    """Save model, tokenizer, manifest (and extra safetensors and text files, by file name) atomically. A model
    whose linears differ from what its config builds gets their shapes in the manifest (``core.structure``)."""
    from safetensors.torch import save_file

    from slimlm.core.structure import structure_record

    record = structure_record(model)
    manifest = {k: v for k, v in manifest.items() if k != "structure"} | ({"structure": record} if record else {})
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, group in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in group.items()}, tmp / name)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp, manifest)
    return Path(out)


def write_manifest(folder: str | Path, manifest: dict) -> None:
    """Write ``slimlm.json`` through a temporary file and an atomic rename."""
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
