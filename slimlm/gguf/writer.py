"""Writing a GGUF file: the architecture's hyperparameters (llama, qwen2, qwen3, gemma3), the tokenizer
(``gguf.tokenizer``), tensors already encoded, written atomically.

Metadata from the GGUF spec (ggml docs/gguf.md: keys ``{arch}.*``) with ``gguf.GGUFWriter``. Shared by
``gguf.export`` (exports of saved runs) and ``gguf.quantize`` (models quantized onto llama.cpp's types).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from slimlm.core.files import follow_umask
from slimlm.errors import SlimlmError
from slimlm.gguf.tokenizer import add_tokenizer
from slimlm.runs.save import atomic_dir

GGUF_FILE = "model.gguf"  # the file's name inside an output folder
T = gguf.GGMLQuantizationType
UNQUANTIZED = (T.F32, T.F16)  # written from numpy's own dtypes; others as raw bytes


# HF model_type -> llama.cpp architecture. llama.cpp's llama rope rotates adjacent pairs, so llama's q/k rows are
# reordered (``rope_interleave``); qwen2/qwen3/gemma3 use the NEOX rope, HF's own layout.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
                 "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
ROPE_INTERLEAVED = {"llama"}
# Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so the file stores w + 1 (every '*norm.weight').
NORM_SHIFT = {"gemma3_text": 1.0}


def rope_rows(config: dict) -> dict[str, int]:
    """Linear role -> head dim, for the q_proj / k_proj rows (weights and biases) llama.cpp wants in ggml's rotary
    layout (llama); empty for NEOX-rope architectures. A tensor's head count is its rows // head dim, so layers
    of different widths (``slimlm shrink``) reorder right."""
    if config["model_type"] not in ROPE_INTERLEAVED:
        return {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {"q_proj": head_dim, "k_proj": head_dim}


def rope_interleave(W: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q_proj / k_proj from HF's rotary layout (per head: first halves, then second halves) to ggml's
    (rotated pairs adjacent), as llama.cpp's converter reorders them."""
    return W.reshape(heads, 2, W.shape[0] // heads // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)


def check_architecture(config: dict) -> str:
    """The llama.cpp architecture name of an HF config we can write (llama, qwen2, qwen3, gemma3 text), or
    SlimlmError naming what llama.cpp would compute differently."""
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise SlimlmError(f"GGUF writing supports {', '.join(ARCHITECTURES)} models; this one is '{kind}'")
    if kind == "gemma3_text":
        _check_gemma3(config)
    elif config.get("use_sliding_window"):
        raise SlimlmError("GGUF: sliding-window attention is not written")
    written = ("default", "linear") if kind == "gemma3_text" else ("default",)  # gemma3 4B+: linear, global layers
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in written:
        raise SlimlmError(f"GGUF: rope_type '{rope_type}' (rope scaling) is not written")
    return gguf.MODEL_ARCH_NAMES[ARCHITECTURES[kind]]


def _check_gemma3(config: dict) -> None:
    """What llama.cpp's gemma3 graph fixes: queries scaled by 1/sqrt(head_dim) (hidden/heads for the 62-layer
    27B), no attention-logit soft-capping, causal attention, unscaled rope on the sliding layers."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    scale_dim = hidden // heads if config["num_hidden_layers"] == 62 else config["head_dim"]
    if config.get("query_pre_attn_scalar", scale_dim) != scale_dim:
        raise SlimlmError(f"GGUF: llama.cpp's gemma3 scales queries by 1/sqrt({scale_dim}); this model's "
                          f"query_pre_attn_scalar is {config['query_pre_attn_scalar']}")
    if config.get("attn_logit_softcapping") or config.get("use_bidirectional_attention"):
        raise SlimlmError("GGUF: gemma3 with attention soft-capping or bidirectional attention is not written")
    if _rope(config, "sliding_attention").get("rope_type", "default") != "default":
        raise SlimlmError("GGUF: rope scaling on gemma3's sliding-window layers is not written")


def _rope(config: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters (transformers 5's ``rope_parameters``, per layer type for gemma3; older configs keep
    ``rope_theta``/``rope_scaling`` at the top)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope = rope.get(layer_type, rope) if isinstance(rope.get(layer_type), dict) else rope
    return {"rope_theta": config.get("rope_theta", 10000.0)} | rope


def per_layer_architecture(config: dict) -> str:
    """The llama.cpp architecture for layers of different widths. Its llama graph sizes every layer's tensors from
    layer 0's head count and MLP width; its 'deci' architecture (Llama blocks of varying width, from DeciLM and
    Nemotron-NAS) reads the per-layer arrays, with the same tensors and rotary layout."""
    if config.get("model_type") != "llama":
        raise SlimlmError(f"GGUF: layers of different widths are written for llama models only (llama.cpp's 'deci' "
                          f"architecture); this one is '{config.get('model_type')}': shrink with uniform widths")
    check_architecture(config)
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DECI]


def tensor_names(config: dict):
    """HF tensor name -> GGUF name for a supported config (``gguf``'s name map); SlimlmError when it has none."""
    names = gguf.get_tensor_name_map(ARCHITECTURES[config["model_type"]], config["num_hidden_layers"])

    def name(hf: str) -> str:
        base, _, suffix = hf.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None or suffix not in ("weight", "bias"):
            raise SlimlmError(f"tensor {hf} has no GGUF {config['model_type']} name")
        return f"{mapped}.{suffix}"
    return name


def write_gguf(out: Path, config: dict, tokenizer, source, tensors: list[tuple[str, np.ndarray, T]],
               file_type: gguf.LlamaFileType, record: dict, recipe: str | None, name: str,
               progress: bool = True, widths: list[tuple[int, int, int]] | None = None) -> Path:
    """Write ``tensors`` (GGUF name, data, type) with the llama metadata of ``config``, the ``tokenizer``'s
    vocabulary, ``record`` as the key ``slimlm.export`` and ``recipe`` as ``slimlm.recipe``; atomically (see
    ``write_atomic``). ``widths``: per layer (heads, KV heads, MLP width) where layers differ, written as GGUF's
    per-layer arrays (``per_layer_architecture``). Returns the file written."""
    arch = check_architecture(config) if widths is None else per_layer_architecture(config)
    vocab = next(data.shape[0] for gname, data, _ in tensors if gname == "token_embd.weight")

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, arch)
        writer.add_name(name)
        writer.add_file_type(file_type)
        if any(qtype not in (T.F32, T.F16, T.BF16) for _, _, qtype in tensors):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_llama_config(writer, config, vocab, widths)
        add_tokenizer(writer, tokenizer, source, vocab)
        writer.add_string("slimlm.export", json.dumps(record))
        if recipe is not None:
            writer.add_string("slimlm.recipe", recipe)
        for gguf_name, data, qtype in tensors:
            writer.add_tensor(gguf_name, data, raw_dtype=None if qtype in UNQUANTIZED else qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    return write_atomic(out, write)


def check_llama(config: dict) -> None:
    """Exports of saved runs (``gguf.export``) write llama-architecture runs only."""
    if config.get("model_type") != "llama":
        raise SlimlmError(f"GGUF export writes llama-architecture runs; this run is '{config.get('model_type')}'")
    check_architecture(config)


def _add_llama_config(writer: gguf.GGUFWriter, config: dict, vocab: int,
                      widths: list[tuple[int, int, int]] | None = None) -> None:
    """The ``{arch}.*`` hyperparameters (GGUF spec, LLM section) from an HF llama/qwen2/qwen3/gemma3 config;
    per-layer head counts and MLP widths as arrays when ``widths`` gives them."""
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = _rope(config)
    per_layer = [list(column) for column in zip(*widths)] if widths else None
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(per_layer[2] if widths else config["intermediate_size"])
    writer.add_head_count(per_layer[0] if widths else heads)
    writer.add_head_count_kv(per_layer[1] if widths else config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(vocab)
    if widths or head_dim != hidden // heads:  # llama.cpp would take n_embd / heads (of layer 0)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config["model_type"] == "gemma3_text":
        _add_gemma3_config(writer, config, rope)


def _add_gemma3_config(writer: gguf.GGUFWriter, config: dict, rope: dict) -> None:
    """Sliding-window layers as an explicit per-layer flag array (llama.cpp's default is every sixth layer
    global, which a config's ``layer_types`` need not follow), their own rope base, and the global layers'
    linear rope scaling."""
    writer.add_sliding_window(config["sliding_window"])
    writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
    writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention")["rope_theta"]))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def write_atomic(out: Path, write) -> Path:
    """Call ``write(path)`` on a temporary file beside ``out`` (or inside a temporary folder) and rename it
    into place; nothing is left behind on error."""
    if out.suffix != ".gguf":
        with atomic_dir(out) as tmp:
            write(tmp / GGUF_FILE)
        return out / GGUF_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        follow_umask(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
