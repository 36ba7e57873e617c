"""A GGUF file's metadata (its key-value header) read without its tensors.

``gguf.GGUFReader`` maps every field and tensor into numpy views up front: on the built-in model's file (49k tokens,
49k merges) that took 14.6 s of a busy 2-core machine, for the two keys export needs. This reads the header once
with ``struct``. Written from the GGUF spec (ggml docs/gguf.md): little-endian; magic "GGUF", version (2 or 3),
tensor count and key-value count as uint64; then per key a string (uint64 length + UTF-8 bytes), a uint32 value
type and the value, an array being its item type (uint32), its length (uint64) and its items.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

from slimlm.errors import SlimlmError

SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # type -> struct
STRING, ARRAY = 8, 9


def read_metadata(path: str | Path, keys: Iterable[str]) -> dict:
    """The values of those ``keys`` the file has (str, int, float, bool, or lists of them); the header is read
    only up to the last key wanted."""
    wanted, found = set(keys), {}
    try:
        with open(path, "rb") as f:
            magic, version, _, count = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or version not in (2, 3):
                raise SlimlmError(f"{path} is not a little-endian GGUF file of version 2 or 3")
            for _ in range(count):
                if found.keys() == wanted:
                    break
                key = _string(f)
                (kind,) = struct.unpack("<I", f.read(4))
                value = _value(f, kind)
                if key in wanted:
                    found[key] = value
    except (struct.error, UnicodeDecodeError) as e:
        raise SlimlmError(f"cannot read the GGUF metadata of {path}: {e}") from e
    return found


def _string(f: BinaryIO, limit: int | None = None) -> str:
    (length,) = struct.unpack("<Q", f.read(8))
    if limit is not None and length > limit:  # damaged: no string is longer than the file
        raise ValueError(f"string of {length} bytes")
    return f.read(length).decode("utf-8")


def _value(f: BinaryIO, kind: int):
    if kind == STRING:
        return _string(f)
    if kind == ARRAY:
        item, length = struct.unpack("<IQ", f.read(12))
        if item in SCALARS:  # a block of fixed-size numbers: one unpack
            return list(struct.unpack(f"<{length}{SCALARS[item]}", f.read(length * struct.calcsize(SCALARS[item]))))
        return [_value(f, item) for _ in range(length)]
    if kind not in SCALARS:
        raise SlimlmError(f"unknown GGUF metadata value type {kind}")
    return struct.unpack(f"<{SCALARS[kind]}", f.read(struct.calcsize(SCALARS[kind])))[0]


_WHOLE: set[tuple[str, int, int]] = set()  # files found whole (path, size, mtime): a command checks before loading,
# and loading checks again; the header of a large vocabulary takes seconds to read


def check_file(path: str | Path) -> None:
    """A whole GGUF file, checked from its header and tensor table in about a second, before anything is converted
    or handed to llama.cpp: one line saying "not a GGUF file" or "truncated" (or that a field is unreadable)
    otherwise. The tensors' data must end inside the file: data start (aligned) + offset + bytes of its type."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _WHOLE:
        _check_tensor_table(path, stat.st_size)
        _WHOLE.add(key)


def _check_tensor_table(path: str | Path, size: int) -> None:
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SlimlmError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
            version, tensors, count = struct.unpack("<IQQ", f.read(20))
            if version not in (2, 3) or max(tensors, count) > size:
                raise SlimlmError(f"{path} is not a GGUF file slimlm reads (version {version}, little-endian 2 or 3)")
            alignment = 32  # GGUF's default (general.alignment)
            for _ in range(count):
                key = _string(f, size)
                (kind,) = struct.unpack("<I", f.read(4))
                value = _value(f, kind)
                alignment = value if key == "general.alignment" else alignment
            ends = [0]
            for _ in range(tensors):
                _string(f, size)
                (ndim,) = struct.unpack("<I", f.read(4))
                dims = struct.unpack(f"<{ndim}Q", f.read(8 * ndim))
                qtype, offset = struct.unpack("<IQ", f.read(12))
                block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
                ends.append(offset + math.prod(dims) // block * nbytes)
            start = f.tell() + (-f.tell()) % alignment
    except SlimlmError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, KeyError, OverflowError, MemoryError):
        raise SlimlmError(f"{path} is truncated or damaged: its GGUF header cannot be read to the end") from None
    if start + max(ends) > size:
        raise SlimlmError(f"{path} is truncated: its tensor data ends at byte {start + max(ends):,}, the file has "
                          f"{size:,}")
