"""Byte layouts of llama.cpp's weight types: a ``gguf.types.Fitted`` tensor -> the bytes GGUF stores.

Written from ggml-common.h's block structs and the order in which ggml's dequantize_row_* reads them (QK_K = 256;
all multi-byte fields little-endian). Each function takes codes shaped (rows, nblocks, block) and returns
(rows, nblocks, bytes) uint8; tests decode the result with the ``gguf`` package and with llama.cpp.
"""
from __future__ import annotations

import numpy as np
import torch

from slimlm.gguf.types import Fitted

U8 = torch.uint8


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(U8).reshape(*x.shape, 2)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bits_of(q: torch.Tensor, bit: int) -> torch.Tensor:
    """Bit ``bit`` of 32 codes (..., 32) packed little-endian into 4 bytes (qh of Q5_0/Q5_1)."""
    b = ((q >> bit) & 1).reshape(*q.shape[:-1], 4, 8)
    return (b << torch.arange(8, dtype=U8)).sum(-1, dtype=torch.int32).to(U8)


def _legacy(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: d (and m) then, for 4/5 bits, weight j in the low nibble of byte j and
    weight j + 16 in its high nibble, the fifth bits in a 32-bit word; Q8_0 stores q - 128 as int8."""
    parts = [_f16_bytes(f.d)]
    if f.kind.has_min:
        parts.append(_f16_bytes(f.dmin))
    if f.kind.name == "Q8_0":
        parts.append((q.to(torch.int16) - 128).to(torch.int8).view(U8))
    else:
        if f.kind.qmax == 31:
            parts.append(_bits_of(q, 4))
        parts.append(_nibbles(q[..., :16], q[..., 16:]))
    return torch.cat(parts, -1)


def _two_bit_planes(q: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K low bits: per 128 weights, 32 bytes whose bit pair 2j holds weight 32j + l (l = byte)."""
    x = q.reshape(*q.shape[:-1], 2, 4, 32) & 3
    return (x << torch.tensor([0, 2, 4, 6], dtype=U8).view(4, 1)).sum(-2, dtype=torch.int32).to(U8).flatten(-2)


def _q2_k(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    scales = (f.sc.to(U8) & 0xF) | ((f.mn.to(U8) & 0xF) << 4)
    return torch.cat([scales, _two_bit_planes(q), _f16_bytes(f.d), _f16_bytes(f.dmin)], -1)


def _q3_k_scales(sc: torch.Tensor) -> torch.Tensor:
    """16 six-bit values (sc + 32) into 12 bytes: low nibbles of 0..7 and 8..15 in bytes 0..7, the high two bits
    of value i in byte 8 + i % 4 at bit 2·(i // 4)."""
    v = (sc.to(torch.int16) + 32).to(U8)
    low = _nibbles(v[..., :8], v[..., 8:])
    high = (v >> 4).reshape(*v.shape[:-1], 4, 4)  # [i // 4, i % 4]
    high = (high << torch.tensor([0, 2, 4, 6], dtype=U8).view(4, 1)).sum(-2, dtype=torch.int32).to(U8)
    return torch.cat([low, high], -1)


def _q3_k(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    high = (q >> 2) & 1  # hmask bit 4n + j of byte l is weight 128n + 32j + l
    hmask = (high.reshape(*q.shape[:-1], 8, 32) << torch.arange(8, dtype=U8).view(8, 1)).sum(-2, dtype=torch.int32)
    return torch.cat([hmask.to(U8), _two_bit_planes(q), _q3_k_scales(f.sc), _f16_bytes(f.d)], -1)


def _k4_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 mins into 12 bytes (ggml's get_scale_min_k4): j < 4 in the low 6 bits of bytes j
    (scale) and j + 4 (min); j ≥ 4: low nibbles in byte j + 4 (scale low, min high), top 2 bits in bits 6-7 of
    bytes j - 4 (scale) and j (min)."""
    sc, mn = sc.to(U8), mn.to(U8)
    first = torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6)], -1)
    return torch.cat([first, _nibbles(sc[..., 4:], mn[..., 4:])], -1)


def _q45_k(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: per 64 weights, 32 bytes with weight l in the low nibble and weight 32 + l in the high one;
    Q5_K's fifth bits: bit 2c (and 2c + 1) of byte l for weight 64c + l (and 64c + 32 + l)."""
    x = q.reshape(*q.shape[:-1], 4, 2, 32)
    parts = [_f16_bytes(f.d), _f16_bytes(f.dmin), _k4_scales(f.sc, f.mn)]
    if f.kind.qmax == 31:
        fifth = ((x >> 4) & 1).flatten(-3, -2)  # (..., 8, 32): bit index 2c + half
        parts.append((fifth << torch.arange(8, dtype=U8).view(8, 1)).sum(-2, dtype=torch.int32).to(U8))
    parts.append(_nibbles(x[..., 0, :], x[..., 1, :]).flatten(-2))
    return torch.cat(parts, -1)


def _q6_k(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    """Q6_K: per 128 weights, ql 64 bytes (weights l and 64 + l in nibbles of byte l, 32 + l and 96 + l in byte
    32 + l) and qh 32 bytes (top 2 bits of weights l, 32 + l, 64 + l, 96 + l at bits 0, 2, 4, 6 of byte l)."""
    x = q.reshape(*q.shape[:-1], 2, 4, 32)
    ql = torch.cat([_nibbles(x[..., 0, :], x[..., 2, :]), _nibbles(x[..., 1, :], x[..., 3, :])], -1)
    qh = ((x >> 4) << torch.tensor([0, 2, 4, 6], dtype=U8).view(4, 1)).sum(-2, dtype=torch.int32).to(U8)
    return torch.cat([ql.flatten(-2), qh.flatten(-2), f.sc.to(torch.int8).view(U8), _f16_bytes(f.d)], -1)


def _iq4_nl(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    """IQ4_NL: d, then the codebook indices as Q4_0 stores its nibbles (weight j low, j + 16 high)."""
    return torch.cat([_f16_bytes(f.d), _nibbles(q[..., :16], q[..., 16:])], -1)


def _iq4_xs(f: Fitted, q: torch.Tensor) -> torch.Tensor:
    """IQ4_XS: d; scales_h, a 16-bit word with the top 2 bits of sub-block i's 6-bit scale (sc + 32) at bit 2i;
    scales_l, 4 bytes with the low nibbles of scales 2k (low) and 2k + 1 (high); then each 32 weights' nibbles
    as IQ4_NL's."""
    v = (f.sc.to(torch.int16) + 32).to(torch.int32)
    high = ((v >> 4) << torch.arange(0, 16, 2, dtype=torch.int32)).sum(-1)
    scales_h = torch.stack([high & 0xFF, high >> 8], -1).to(U8)
    scales_l = _nibbles(v[..., 0::2].to(U8), v[..., 1::2].to(U8))
    x = q.reshape(*q.shape[:-1], 8, 32)
    return torch.cat([_f16_bytes(f.d), scales_h, scales_l, _nibbles(x[..., :16], x[..., 16:]).flatten(-2)], -1)


PACKERS = {"Q4_0": _legacy, "Q4_1": _legacy, "Q5_0": _legacy, "Q5_1": _legacy, "Q8_0": _legacy,
           "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q45_k, "Q5_K": _q45_k, "Q6_K": _q6_k, "IQ4_NL": _iq4_nl,
           "IQ4_XS": _iq4_xs}


def pack(f: Fitted) -> np.ndarray:
    """The tensor's GGUF bytes, (rows, nblocks · bytes per block) uint8."""
    rows, n = f.q.shape
    q = f.q.to(U8).reshape(rows, n // f.kind.block, f.kind.block)
    out = PACKERS[f.kind.name](f, q)
    assert out.shape[-1] == f.kind.nbytes, (f.kind.name, out.shape)
    return out.reshape(rows, -1).numpy()
