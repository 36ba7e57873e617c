"""llama.cpp's named file types (Q4_K_M, Q3_K_M, ...) as per-tensor GGUF types, picked by the same rules as
``llama-quantize`` (llama.cpp src/llama-quant.cpp: llama_tensor_get_type and its fallback for rows that a type's
block does not divide), for dense llama-family models. A test compares the result with the types llama-quantize
writes for the built-in model.

The rules, per tensor in file order (GGUF names ``blk.N.attn_v.weight`` ...):
- the main type of the mix, then bumps: attn_v and ffn_down get more bits in about half the layers
  (``use_more_bits``: the first and last eighth and every third layer between) for Q4_K_M/Q5_K_M, in the first
  layers for Q4_K_S/Q3_K_M, more for Q2_K; attn_output gets Q3_K/Q4_K in Q2_K/Q3_K_M;
- output.weight (or the token embedding when tied to it): Q6_K, or Q8_0 when its rows do not fit 256-blocks or
  the mix is Q8_0; an untied token embedding takes the main type;
- IQ4_NL/IQ4_XS: attn_v Q5_K where 4 or more query heads share a KV head, the first eighth of ffn_down Q5_K
  without an imatrix;
- then a fallback where the row width is not a multiple of the type's block: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL (F16 if even 32 does not divide it). 1-D tensors (norms) stay
  F32.
"""
from __future__ import annotations

import re

from slimlm.errors import SlimlmError

MIXES = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K",
         "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
         "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "F16": "F16",
         "F32": "F32"}  # mix -> main type
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
IQ4 = ("IQ4_NL", "IQ4_XS")


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _role(name: str) -> str:
    match = re.fullmatch(r"(?:blk\.\d+\.)?(\w+)\.weight", name)
    return match.group(1) if match else name


def _bumped(mix: str, role: str, i: int, n: int, gqa: int, has_imatrix: bool, main: str) -> str:
    """llama_tensor_get_type's choice for a block tensor of role ``role`` in layer i of n (before fallback)."""
    if role == "attn_v":
        return {"Q2_K": "Q4_K" if gqa >= 4 else "Q3_K",
                "Q3_K_M": "Q5_K" if i < 2 else "Q4_K",
                "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if use_more_bits(i, n) else main,
                "Q5_K_M": "Q6_K" if use_more_bits(i, n) else main,
                "Q4_K_S": "Q5_K" if i < 4 else main,
                **dict.fromkeys(IQ4, "Q5_K" if gqa >= 4 else main)}.get(mix, main)
    if role == "ffn_down":
        rule = {"Q2_K": "Q3_K",
                "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K",
                "Q3_K_L": "Q5_K",
                "Q4_K_M": "Q6_K" if use_more_bits(i, n) else main,
                "Q5_K_M": "Q6_K" if use_more_bits(i, n) else main,
                "Q4_K_S": "Q5_K" if i < n // 8 else main}
        if mix in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            return {"Q4_0": "Q4_1", "Q5_0": "Q5_1"}[mix]  # llama.cpp's guard for the first ffn_down layers
        if mix in IQ4 and not has_imatrix and i < n // 8:
            return "Q5_K"  # the same guard for the non-linear types, without an imatrix
        return rule.get(mix, main)
    if role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, main)
    return main


def block_size(kind: str) -> int:
    """Weights per block: 256 for K-types and IQ4_XS, 32 for the legacy types and IQ4_NL, 1 for floats (no torch
    import here: the CLI parser lists the mixes)."""
    return 256 if kind.endswith("_K") or kind == "IQ4_XS" else 1 if kind.startswith("F") else 32


def fallback(kind: str, width: int) -> str:
    """The type llama-quantize writes for rows of ``width`` when ``kind``'s block does not divide them."""
    if width % block_size(kind):
        kind = FALLBACK.get(kind, kind)
        if width % block_size(kind):
            return "F16"
    return kind


def named_mix(mix: str, shapes: dict[str, tuple[int, ...]], n_layer: int, gqa: int, has_imatrix: bool = False
              ) -> dict[str, str]:
    """GGUF tensor name -> type name for llama.cpp's file type ``mix``. ``shapes`` in file order, each (rows,
    row width); ``gqa`` = attention heads / KV heads."""
    mix = mix.upper()
    if mix not in MIXES:
        raise SlimlmError(f"unknown GGUF mix '{mix}'; choose one of {', '.join(MIXES)}")
    main, tied = MIXES[mix], "output.weight" not in shapes
    counters: dict[str, int] = {}
    types = {}
    for name, shape in shapes.items():
        role = _role(name)
        if len(shape) < 2:
            types[name] = "F32"
            continue
        width = shape[-1]
        if main in ("F16", "F32"):
            kind = main  # llama-quantize leaves float files' matrices as they are
        elif role == "output" or (tied and role == "token_embd"):
            kind = "Q8_0" if mix == "Q8_0" or width % 256 else "Q6_K"
        elif role == "token_embd":
            kind = main
        else:
            i = counters.get(role, 0)
            counters[role] = i + 1
            kind = _bumped(mix, role, i, n_layer, gqa, has_imatrix, main)
        types[name] = fallback(kind, width)
    return types
