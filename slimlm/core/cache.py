"""slimlm's cache of converted models: a GGUF file dequantized once into a float32 safetensors folder.

The cache lives in ``$SLIMLM_CACHE`` (default ``~/.cache/slimlm``). Each entry is a folder
``<file stem>-<key>``, the key hashing the GGUF file's path, size and modification time, so an edited
file gets a new entry. Its ``slimlm-cache.json`` names the source file; its modification time is when
the entry was last loaded. Entries are only ever removed by ``slimlm cache clear``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from slimlm.core.files import follow_umask
from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)

RECORD = "slimlm-cache.json"
ENTRY_NAME = re.compile(r".+-[0-9a-f]{12}")  # what gguf_to_folder names its folders
UNFINISHED = ".tmp-"  # prefix of a conversion still running, or killed


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


HASHES = "content-hashes.json"  # where a file (path, size, mtime) was hashed before -> its content's sha256


def entry_name(gguf: Path) -> str:
    """The cache folder's name: the file's stem and its content's hash, so that every environment holding the same
    file (a venv's copy of the built-in model, a download) shares one float32 copy. The hash is read once per file
    location (remembered in ``HASHES`` by path, size and mtime) and then costs nothing."""
    return f"{gguf.stem}-{content_hash(gguf)[:12]}"


def content_hash(path: Path) -> str:
    stat = path.stat()
    where = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    index = cache_dir() / HASHES
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if where not in known:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        known[where] = digest.hexdigest()
        with contextlib.suppress(OSError):  # a read-only cache hashes again next time
            index.parent.mkdir(parents=True, exist_ok=True)
            tmp = index.with_name(f"{UNFINISHED}{os.getpid()}-{HASHES}")
            tmp.write_text(json.dumps(known) + "\n")
            os.replace(tmp, index)
    return known[where]


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached float32 HF folder and return the folder."""
    folder = cache_dir() / entry_name(gguf)
    if (folder / "config.json").is_file():
        with contextlib.suppress(OSError):  # "last used" for `slimlm cache list`; a read-only cache still loads
            os.utime(_used_marker(folder))
        return folder
    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, folder)
    model, tokenizer = dequantize_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=UNFINISHED, dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps({"source": str(gguf.resolve())}) + "\n")
        follow_umask(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # else another process converted it first
            raise
        return folder
    print(f"slimlm: kept a float32 copy of {gguf.name} in {folder} ({folder_bytes(folder) / 1e6:.1f} MB; "
          "`slimlm cache clear` removes it, --no-cache skips it)", file=sys.stderr)
    return folder


def dequantize_gguf(gguf: Path):
    """``(model, tokenizer)``: the GGUF file's weights dequantized into a plain float32 model (~30 s for
    the built-in model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many types on corrupt files
        raise SlimlmError(f"cannot read GGUF file {gguf}: {e}") from e
    # A GGUF-loaded model is flagged as quantized and save_pretrained refuses it: copy its
    # dequantized weights into a plain model built from the same config.
    config = quantized.config
    del config.quantization_config  # else the reloaded folder is still treated as GGUF-quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def _used_marker(folder: Path) -> Path:
    """The file whose modification time says when an entry was last loaded (the folder for old entries)."""
    record = folder / RECORD
    return record if record.is_file() else folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass
class CacheEntry:
    path: Path
    bytes: int
    source: str | None  # None for entries converted before the record was written, and unfinished ones
    last_used: datetime


def cache_entries() -> list[CacheEntry]:
    """Every converted folder in the cache, and every unfinished conversion's folder, by name."""
    root, entries = cache_dir(), []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        finished = ENTRY_NAME.fullmatch(path.name) and (path / "config.json").is_file()
        if not path.is_dir() or not (finished or path.name.startswith(UNFINISHED)):
            continue  # not ours: SLIMLM_CACHE may point at a folder that holds other things
        record = path / RECORD
        source = json.loads(record.read_text())["source"] if record.is_file() else None
        used = datetime.fromtimestamp(_used_marker(path).stat().st_mtime)
        entries.append(CacheEntry(path, folder_bytes(path), source, used))
    return entries


def clear_cache(names: list[str], everything: bool = False) -> list[CacheEntry]:
    """Remove the entries named (by folder name, or by their GGUF file: each copy recorded as made from that
    path, and the one of its current version), or all of them; return what was removed. Nothing is removed
    when a name matches no entry."""
    if everything == bool(names):
        raise SlimlmError("name the entries to remove (see `slimlm cache list`) or pass --all, not both")
    entries = cache_entries()
    chosen = list(entries) if everything else []
    for name in names:
        path = Path(name)
        folders = {name, entry_name(path) if path.is_file() else name}
        found = [e for e in entries if e.path.name in folders or e.source == str(path.resolve())]
        if not found:
            raise SlimlmError(f"no cache entry '{name}' in {cache_dir()}; `slimlm cache list` shows them")
        chosen += [e for e in found if e not in chosen]
    for entry in chosen:
        shutil.rmtree(entry.path)
    if everything:
        (cache_dir() / HASHES).unlink(missing_ok=True)
    return chosen
