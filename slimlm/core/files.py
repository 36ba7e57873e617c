"""Run folders as the lower layers read them: the manifest's name and reader, and file modes that follow the
umask. ``runs.save`` writes run folders with these; ``core`` reads saved runs (a run as a model, ``core.models``;
its shards, ``core.shards``) and writes its cache (``core.cache``) without depending on ``runs``.
"""
from __future__ import annotations

import os
from pathlib import Path

from slimlm.errors import read_json

MANIFEST = "slimlm.json"


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    return read_json(path)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give ``path`` and everything under it the modes a plain ``open``/``mkdir`` would: mkdtemp makes
    folders 0700, and safetensors (0.8) writes every file 0600, whatever the umask."""
    path, mask = Path(path), umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
