"""Storage of integer codes: dense bit packing into int32 words, and the real bytes of a packed weight."""
import math

import torch
import torch.nn.functional as F

from slimlm.core.architectures import linear_fqns
from slimlm.errors import SlimlmError
from slimlm.quant.grids import CODE_DTYPE, QuantGrid


def _word_bytes(count: int, bits: int) -> int:
    """Bytes of `count` b-bit codes packed densely into int32 words."""
    return math.ceil(count * bits / 32) * 4


def pack_int(codes: torch.Tensor, bits: int, signed: bool = False) -> torch.Tensor:
    """Pack b-bit codes along the last dim into int32 words, densely: code i occupies bits [i·b, i·b + b) of a
    little-endian bit stream, so each row takes ceil(n·b/32) words (the last zero-padded) and a code may straddle
    two words when 32 % b != 0. Signed codes are stored offset by 2^(b-1). This is compressed-tensors'
    pack-quantized layout (pack_to_int32, packed_dim=1); for 4 and 8 bits it is the classic 8 or 4 codes per word.
    """
    if not 1 <= bits <= 8:
        raise SlimlmError(f"bits must be in 1..8 for packing, got {bits!r}")
    n = codes.shape[-1]
    u = codes.to(torch.int64) + (2 ** (bits - 1) if signed else 0)
    if u.numel() and (u.min() < 0 or u.max() >= 2**bits):
        raise SlimlmError(f"codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} packing")
    u = F.pad(u, (0, -n % 32)).unflatten(-1, (-1, 32)).movedim(-1, 0).contiguous()  # (32, ..., chunks)
    words = u.new_zeros(bits, *u.shape[1:])  # a chunk of 32 codes fills exactly `bits` words
    for k in range(32):
        w, shift = divmod(k * bits, 32)
        words[w] |= (u[k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code's high bits spill into the next word
            words[w + 1] |= u[k] >> (32 - shift)
    words = words.movedim(0, -1).flatten(-2)[..., : math.ceil(n * bits / 32)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed int32


def unpack_int(packed: torch.Tensor, bits: int, n: int, signed: bool = False) -> torch.Tensor:
    """Inverse of pack_int: the first n codes of each row of int32 words, as CODE_DTYPE."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = F.pad(words, (0, -words.shape[-1] % bits)).unflatten(-1, (-1, bits)).movedim(-1, 0).contiguous()
    u = words.new_zeros(32, *words.shape[1:])  # (32, ..., chunks)
    for k in range(32):
        w, shift = divmod(k * bits, 32)
        u[k] = words[w] >> shift
        if shift + bits > 32:
            u[k] |= words[w + 1] << (32 - shift)
    u = (u & (2**bits - 1)).movedim(0, -1).flatten(-2)[..., :n]
    return (u - (2 ** (bits - 1) if signed else 0)).to(CODE_DTYPE)


def packed_bytes(shape: tuple[int, int], grid: QuantGrid, mask_density: float | None = None) -> int:
    """Real bytes of a (out, in) weight stored as packed integer codes (the compressed-tensors layout):

    - codes: pack_int per row, ceil(in·b/32) int32 words; if ``mask_density`` (kept fraction) is given, only
      round(density·out·in) kept codes are packed (one dense stream) plus a 1-bit mask, ceil(in/8) bytes per row;
    - scales: float16 per (row, group);
    - zero points (asymmetric only): b-bit, packed along the output dim, ceil(out·b/32) words per group.
    """
    out, n = shape
    ngroups = 1 if grid.group_size is None else math.ceil(n / grid.group_size)
    if mask_density is None:
        codes = out * _word_bytes(n, grid.bits)
    elif 0 < mask_density <= 1:
        codes = _word_bytes(round(mask_density * out * n), grid.bits) + out * math.ceil(n / 8)
    else:
        raise SlimlmError(f"mask_density is the kept fraction, in (0, 1]; got {mask_density!r}")
    zeros = 0 if grid.symmetric else ngroups * _word_bytes(out, grid.bits)
    return codes + out * ngroups * 2 + zeros


def storage_report(model, grids: dict[str, QuantGrid], densities: dict[str, float] | None = None) -> dict:
    """Real bytes of the compressed model: packed codes + scales + zero points (+ 1-bit masks) for the
    quantized linears, everything else at its stored dtype; shared (tied) tensors counted once."""
    linears = linear_fqns(model)
    quantized = {fqn: packed_bytes(tuple(linears[fqn].weight.shape), grid, (densities or {}).get(fqn))
                 for fqn, grid in grids.items()}
    skip = {id(linears[f].weight) for f in grids}
    seen, other_bytes, params = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        if id(p) not in skip:
            other_bytes += p.numel() * p.element_size()
    linear_params = sum(linears[f].weight.numel() for f in grids)
    total = sum(quantized.values()) + other_bytes
    return {"total_bytes": total, "bytes_per_param": total / params,
            "quantized_linear_bytes_per_param": sum(quantized.values()) / linear_params,
            "other_bytes": other_bytes, "params": params}
