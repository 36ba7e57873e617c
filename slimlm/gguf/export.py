"""GGUF export of a saved llama-architecture run: one file that llama.cpp runs and transformers reads
(``from_pretrained(folder, gguf_file=name)``).

Written from the GGUF spec (ggml docs/gguf.md: metadata keys ``llama.*``, ``tokenizer.ggml.*``, tensor names
``blk.N.attn_q.weight`` ... taken from the ``gguf`` package's name map) with ``gguf.GGUFWriter`` (``gguf.writer``).
Block types (``gguf.types``; 32 weights per block along the input dimension, scales in float16), packed by the
same encoder as ``gguf.quantize``'s files (``gguf.blocks``):

- ``Q8_0``: d, 32 int8 q; x = d·q                                       (34 bytes, 8.5 bits per weight)
- ``Q4_0``: d, 16 bytes; x = d·(q - 8)                                  (18 bytes, 4.5 bits per weight)
- ``Q4_1``: d, m, 16 bytes as Q4_0; x = d·q + m                           (20 bytes, 5 bits per weight)

A quantized linear maps onto a block type only when that is exact: its groups are whole blocks (group size a
multiple of 32, or one group per row), its integer codes fit the block's, and d (and m = -zero·d) are float16
values. Codes and steps are read back from the saved weights with ``formats.codes.recover_grid``; every tensor is then
decoded with ``gguf.quants.dequantize`` and compared with the run's weights bit for bit. ``quant.grids.float16_scales``
(``--scale-dtype float16`` at quantize time) makes the scales float16; without it ``exact=False`` rounds them
and reports the largest deviation. Unquantized runs (pruned ones too: GGUF has no sparse type) are written as
float. Norms are always F32, as llama.cpp expects.

HF Llama applies rotary embeddings to the two halves of each head (rotate_half: pairs i, i + d/2); ggml's
llama rope rotates adjacent pairs (2i, 2i + 1). llama.cpp's converter therefore reorders the rows of q_proj
and k_proj per head (``rope_interleave``); transformers' GGUF loader undoes it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from slimlm.core.linalg import small_op_threads
from slimlm.errors import SlimlmError
from slimlm.formats.codes import recover_grid
from slimlm.formats.source import check_new, check_runtime, linear_weights, read_run, run_grids
from slimlm.gguf.blocks import pack
from slimlm.gguf.types import TYPES, Fitted, GGUFType
from slimlm.gguf.writer import check_llama, rope_interleave, rope_rows, tensor_names, write_gguf
from slimlm.quant.grids import QuantGrid

logger = logging.getLogger(__name__)

__all__ = ["export_gguf", "GGUF_TYPES"]

QK = 32  # weights per block for Q4_0, Q4_1, Q8_0
T = gguf.GGMLQuantizationType

BLOCKS = [TYPES["Q4_0"], TYPES["Q4_1"], TYPES["Q8_0"]]  # cheapest first: auto picks the first that holds a grid
FLOATS = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}
GGUF_TYPES = ["auto", *FLOATS, *(b.name.lower() for b in BLOCKS)]
FILE_TYPES = {T.F32: gguf.LlamaFileType.ALL_F32, T.F16: gguf.LlamaFileType.MOSTLY_F16,
              T.BF16: gguf.LlamaFileType.MOSTLY_BF16, T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
MAPPABLE = ("groups of a multiple of 32 (or per channel) with float16 scales (quantize with --scale-dtype "
            "float16): symmetric <=4-bit -> Q4_0, <=4-bit -> Q4_1, symmetric <=8-bit or asymmetric <=7-bit -> Q8_0")


# ---------------------------------------------------------------- plan: which GGUF type each tensor gets

def block_grid(block: GGUFType) -> QuantGrid:
    """A legacy block type as an integer grid, which reads a block's codes back (recover_grid): the signed codes
    q - offset of a symmetric type, the codes q of a type with a min (which adds m = -zero·d)."""
    return QuantGrid(block.qmax.bit_length(), not block.has_min, block.block)


def _holds(block: GGUFType, grid: QuantGrid) -> bool:
    """Whether every 32-weight block of a weight on ``grid`` is a ``block`` block up to float16 rounding:
    groups are whole blocks, and the grid's signed codes (asymmetric: code - zero, in [-(2^b-1), 2^b-1]
    spanning at most 2^b-1) fit the block's codes (Q4_1: any span of at most 15)."""
    if grid.group_size is not None and grid.group_size % QK:
        return False
    lo, hi = (grid.qmin, grid.qmax) if grid.symmetric else (-grid.qmax, grid.qmax)
    codes = block_grid(block)
    if codes.symmetric:
        return codes.qmin <= lo and hi <= codes.qmax
    return grid.qmax - grid.qmin <= codes.qmax


def _describe(grid: QuantGrid) -> str:
    group = f"group {grid.group_size}" if grid.group_size else "per channel"
    return f"{'symmetric' if grid.symmetric else 'asymmetric'} {grid.bits}-bit {group}"


def _plan(manifest: dict, run: Path, linears: list[str], gguf_type: str, run_float: T) -> dict[str, GGUFType | T]:
    """HF linear weight name -> block type or float type. Quantized runs map each linear onto the cheapest block
    that holds its grid (or the one asked for); a float ``gguf_type`` writes dequantized floats; unquantized
    runs default to their own float type ``run_float``."""
    if gguf_type not in GGUF_TYPES:
        raise SlimlmError(f"unknown GGUF type '{gguf_type}'; choose one of {', '.join(GGUF_TYPES)}")
    quantized = manifest.get("kind") == "quantize" or bool(manifest.get("quantization"))
    if gguf_type in FLOATS or (gguf_type == "auto" and not quantized):
        return {name: FLOATS.get(gguf_type, run_float) for name in linears}
    if not quantized:
        raise SlimlmError(f"--gguf-type {gguf_type} needs a quantized run (export writes the run's own grid, it "
                          f"does not requantize); {run} is a '{manifest.get('kind')}' run: use f32, f16 or bf16")
    grids = run_grids(manifest, run)
    asked = [b for b in BLOCKS if b.name.lower() == gguf_type]
    plan = {}
    for name in linears:
        grid = grids[name.removesuffix(".weight")]
        block = next((b for b in asked or BLOCKS if _holds(b, grid)), None)
        if block is None:
            wanted = f"{gguf_type.upper()} cannot hold" if asked else "no GGUF block type holds"
            raise SlimlmError(f"{wanted} {name}'s {_describe(grid)} grid; GGUF blocks hold {MAPPABLE}; "
                              "or pass --gguf-type f32/f16 to write dequantized weights")
        plan[name] = block
    return plan


# ---------------------------------------------------------------- block encoding

def _values(block: GGUFType, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """ggml's float32 decoding of blocks (n, 32) of signed codes q (codes q with a min) and per-block d (and m)."""
    return Fitted(block, q + block.offset, d.unsqueeze(-1), None if m is None else m.unsqueeze(-1)).values()


def _float16_codes(V: torch.Tensor, K: torch.Tensor, step: torch.Tensor, block: GGUFType, exact: bool):
    """Per block, float16 d (and m) with integer codes q that decode to V (rows, nblocks, 32) exactly.

    recover_grid gives the largest step s with signed multiples K; when s is not a float16 value (s is g·s0 for
    codes sharing a factor g), s/j with codes j·K for a small j often is. Blocks with no exact choice are
    SlimlmError, or with ``exact=False`` take the nearest float16 d (and m) for j = 1.
    Returns (q codes as stored, d, m or None)."""
    codes = block_grid(block)
    sym = codes.symmetric
    shape = step.shape
    V, K, step = V.reshape(-1, QK), K.reshape(-1, QK), step.reshape(-1)
    q = torch.zeros_like(K)
    d = torch.zeros(step.shape, dtype=torch.float16)
    m = None if sym else torch.zeros(step.shape, dtype=torch.float16)
    todo = torch.arange(step.numel())  # blocks still without codes; each j tries only these
    for j in range(1, max(-codes.qmin, codes.qmax) + 1):
        if not todo.numel():
            break
        Kj, dj = K[todo] * j, (step[todo].double() / j).half()
        zero = torch.zeros_like(dj, dtype=K.dtype) if sym else (-Kj.amin(-1)).clamp(min=0)
        qj = Kj + zero.unsqueeze(-1)
        fits = (qj.amin(-1) >= codes.qmin) & (qj.amax(-1) <= codes.qmax)
        mj = None if sym else (-zero.double() * dj.double()).half()
        ok = fits & (_values(block, qj, dj, mj) == V[todo]).all(-1)
        if j == 1 and not exact:
            ok = torch.ones_like(ok)  # nearest float16 values; the deviation is measured after decoding
        hit = todo[ok]
        q[hit], d[hit] = qj[ok], dj[ok]
        if m is not None:
            m[hit] = mj[ok]
        todo = todo[~ok]
    if todo.numel():
        raise SlimlmError(f"{todo.numel()} of {step.numel()} blocks have no exact float16 scale; "
                          "quantize with --scale-dtype float16 for an exact GGUF, or pass --inexact")
    q, d = q.reshape(*shape, QK) + block.offset, d.reshape(shape)  # stored unsigned: x = d·(q - offset)
    m = None if m is None else m.reshape(shape)
    return q, d, m


def _encode_block(W: torch.Tensor, block: GGUFType, name: str, exact: bool) -> tuple[np.ndarray, float]:
    """One quantized weight (out, in) as GGUF blocks, and the largest |decoded - W| (0.0 when exact)."""
    rows, width = W.shape
    if width % QK:
        raise SlimlmError(f"{name} has {width} inputs, not a multiple of GGUF's {QK}-weight blocks")
    codes, step, zero, _ = recover_grid(W, block_grid(block), name, exact)  # exact=False: half-precision runs
    K = codes.long().reshape(rows, -1, QK) - zero.unsqueeze(-1)
    V = W.float().reshape(rows, -1, QK)
    try:
        q, d, m = _float16_codes(V, K, step.float(), block, exact)
    except SlimlmError as e:
        raise SlimlmError(f"{name}: {e}") from None
    packed = pack(Fitted(block, q.reshape(rows, width), d, m))
    deviation = _deviation(gguf.quants.dequantize(packed, T[block.name]), W)
    if exact and deviation:
        raise SlimlmError(f"internal error: {name} does not decode to its weights ({deviation:g})")
    return packed, deviation


def _deviation(decoded: np.ndarray, W: torch.Tensor) -> float:
    return float(np.abs(decoded.astype(np.float64) - W.double().numpy()).max()) if W.numel() else 0.0


def _encode_float(W: torch.Tensor, qtype: T) -> tuple[np.ndarray, float]:
    """A tensor as F32, F16 or BF16 (numpy has no bfloat16: its bits go as uint16), and the largest deviation."""
    if qtype == T.BF16:
        x = W.to(torch.bfloat16)
        return x.view(torch.int16).numpy().view(np.uint16), (x.double() - W.double()).abs().max().item()
    x = W.to(torch.float16 if qtype == T.F16 else torch.float32)
    return x.numpy(), (x.double() - W.double()).abs().max().item()


# ---------------------------------------------------------------- export

def export_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "auto", exact: bool = True,
                recipe: str | None = None, progress: bool = True) -> Path:
    """Write a llama-architecture run as GGUF; returns the file written.

    ``out`` ending in ``.gguf`` is the file; otherwise a new folder holding ``model.gguf``. Never overwrites;
    written to a temporary name and renamed. ``gguf_type``: ``auto`` (quantized runs: each linear in the cheapest
    block type that holds it exactly; others in the run's own float dtype), a block type (``q4_0``, ``q4_1``,
    ``q8_0``) for every quantized linear, or ``f32``/``f16``/``bf16`` for every matrix (quantized runs then
    dequantized). Embeddings and the output matrix keep the run's float dtype unless a float type is asked;
    norms are F32. ``exact=False`` accepts the nearest
    float16 block scales. The metadata key ``slimlm.export`` holds the GGUF type of every tensor, the largest
    absolute deviation from the run's weights, and the run's manifest; ``slimlm.recipe`` the ``recipe`` text.
    ``progress`` shows bars over the tensors as they are encoded and as they are written.
    """
    out = check_new(out)
    run, manifest, tensors, _ = read_run(run_dir)
    config = json.loads((run / "config.json").read_text())
    check_llama(config)
    check_runtime(manifest, "GGUF")
    linears = linear_weights(manifest, tensors)
    run_float = {torch.float16: T.F16, torch.bfloat16: T.BF16}.get(tensors["model.embed_tokens.weight"].dtype, T.F32)
    plan = _plan(manifest, run, linears, gguf_type, run_float)
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)  # llama.cpp uses token_embd when output.weight is absent
    gguf_name = tensor_names(config)
    head_dims = rope_rows(config)
    writer_args, types, deviation = [], {}, 0.0
    for name, W in tqdm(tensors.items(), desc="gguf", disable=not progress):
        role = name.removesuffix(".weight").rpartition(".")[2]
        if role in head_dims:
            W = rope_interleave(W, W.shape[0] // head_dims[role])
        qtype = plan.get(name, FLOATS.get(gguf_type, run_float) if W.dim() == 2 else T.F32)
        if isinstance(qtype, GGUFType):
            with small_op_threads(W.numel()):  # many elementwise passes over one weight
                data, dev = _encode_block(W, qtype, name, exact)
            qtype = T[qtype.name]
        else:
            data, dev = _encode_float(W, qtype)
        writer_args.append((gguf_name(name), data, qtype))
        types[gguf_name(name)], deviation = qtype.name, max(deviation, dev)
    linear_types = [T[plan[n].name] if isinstance(plan[n], GGUFType) else plan[n] for n in linears]
    main_type = max(set(linear_types), key=linear_types.count) if linear_types else T.F32
    record = {"format": "gguf", "source": str(run), "exact": deviation == 0, "max_abs_deviation": deviation,
              "types": types, "manifest": manifest}
    if deviation:
        logger.warning("GGUF values differ from the run's weights by up to %.3g", deviation)
    return write_gguf(out, config, run_tokenizer(run), manifest.get("model"), writer_args, FILE_TYPES[main_type],
                      record, recipe, run.name, progress)


def run_tokenizer(run: Path):
    """The run's tokenizer, or None (with a warning from the writer) when it has no tokenizer.json."""
    if not (run / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run)
