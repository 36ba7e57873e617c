"""slimlm's cache of converted models: a GGUF file dequantized once into a float32 safetensors folder.

The cache lives in ``$SLIMLM_CACHE`` (default ``~/.cache/slimlm``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a cached float32 HF folder and return the folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / f"{gguf.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s (once)", gguf.name, folder)
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
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # else another process converted it first
            raise
    return folder
