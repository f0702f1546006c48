"""GGUF, llama.cpp's single-file model format, read from scratch: header, metadata, tensor table, data.

A GGUF file (spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md) is, in little-endian order:

    magic "GGUF" | version: u32 (2 or 3) | n_tensors: u64 | n_kv: u64
    n_kv metadata entries:   key: string | value type: u32 | value
    n_tensors tensor infos:  name: string | n_dims: u32 | ne[n_dims]: u64 | ggml type: u32 | offset: u64
    padding to `general.alignment` (32 unless the metadata says otherwise)
    tensor data: each tensor at data_start + offset, offsets aligned too

A string is a u64 byte count and UTF-8 bytes (no terminator). A metadata value is one of 13 types:
integers of 8 to 64 bits, float32/64, bool, string, or an array (element type: u32, count: u64,
elements), whose elements may themselves be arrays. Version 1 used 32-bit counts and is refused;
versions 2 and 3 have the same layout (3 added big-endian files, which we also refuse).

Dimensions are listed ggml's way, fastest-varying first: a PyTorch (out, in) weight has ne = [in, out].
We reverse them once here, so every shape outside this file is PyTorch's.

The tensor data is memory-mapped, not read: opening a 100 MB file costs only the header, and a
tensor's bytes are paged in when it is dequantized (gguf_quants.py). Every malformed file ends in
a GGUFError (a ValueError) whose one line names the file and the problem, before anything is
allocated from a size the file claims.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minillm.weights.gguf_quants import GGML_TYPES, OTHER_GGML_TYPES, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions

# Metadata value types: id -> (name, struct format of a scalar); strings (8) and arrays (9) are special.
VALUE_TYPES = {0: ("uint8", "B"), 1: ("int8", "b"), 2: ("uint16", "H"), 3: ("int16", "h"),
               4: ("uint32", "I"), 5: ("int32", "i"), 6: ("float32", "f"), 7: ("bool", "?"),
               8: ("string", None), 9: ("array", None), 10: ("uint64", "Q"), 11: ("int64", "q"),
               12: ("float64", "d")}
STRING, ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file that cannot be read or run; the one-line message names the file and the problem.
    (A ValueError, as checkpoint.CheckpointError is, so callers of load_model catch both alike.)"""


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # PyTorch order (ggml's ne reversed)
    type_id: int  # ggml type, a key of gguf_quants.GGML_TYPES
    offset: int  # byte offset from the start of the file (data_start + the stored offset)
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id].name


@dataclass
class GGUFFile:
    """An opened GGUF file: its metadata (key -> Python value: int, float, bool, str or nested lists)
    and tensor table; `tensor(name)` dequantizes one tensor to float32 from the memory map."""
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    alignment: int
    data_start: int
    _data: np.ndarray = field(repr=False)  # the whole file as a read-only uint8 memmap

    def tensor(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return dequantize(self._data[t.offset:t.offset + t.n_bytes], t.type_id, t.shape)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, problem: str) -> GGUFError:
        return GGUFError(f"{self.path}: {problem}")

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:  # checked before slicing: n may be absurd (2^40)
            raise self.fail(f"truncated: {what} needs {n:,} bytes at offset {self.pos:,}, "
                            f"but the file ends at {len(self.buf):,}")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what + " length")
        raw = self.take(n, f"{what} ({n:,}-byte string)")
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def value(self, type_id: int, what: str, depth: int = 0):
        """One metadata value of type `type_id`; arrays recurse, since their elements may be arrays."""
        if type_id not in VALUE_TYPES:
            raise self.fail(f"{what} has unknown value type {type_id} (GGUF defines 0-12)")
        if type_id == STRING:
            return self.string(what)
        if type_id != ARRAY:
            return self.scalar(VALUE_TYPES[type_id][1], what)
        if depth > 16:
            raise self.fail(f"{what}: arrays nested more than 16 deep")
        item_type, n = self.scalar("I", what + " element type"), self.scalar("Q", what + " length")
        if item_type not in VALUE_TYPES:
            raise self.fail(f"{what} is an array of unknown value type {item_type} (GGUF defines 0-12)")
        fmt = VALUE_TYPES[item_type][1]
        if fmt is not None:  # an array of numbers: one bounds check and one unpack for all of them
            raw = self.take(n * struct.calcsize(fmt), f"{what} ({n:,} × {VALUE_TYPES[item_type][0]})")
            return list(struct.unpack(f"<{n}{fmt}", raw))
        if n > len(self.buf) - self.pos:  # each string/array element takes at least 8 bytes
            raise self.fail(f"truncated: {what} claims {n:,} elements, more than the file holds")
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(n)]


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and tensor table and memory-map its data (nothing is dequantized)."""
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except FileNotFoundError:
        raise GGUFError(f"{path}: missing") from None
    except (OSError, ValueError) as e:  # a folder, no permission, ...
        raise GGUFError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})") from None
    c = _Cursor(memoryview(data), path)

    magic = bytes(c.take(4, "the magic"))
    if magic != GGUF_MAGIC:
        raise c.fail(f"not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    version = c.scalar("I", "the version")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped in (2, 3):
            raise c.fail(f"a big-endian GGUF (version {swapped}); minillm reads little-endian files only")
        raise c.fail(f"GGUF version {version}; minillm reads versions 2 and 3"
                     + (" (version 1 used 32-bit counts; convert it again with a newer llama.cpp)"
                        if version == 1 else ""))
    n_tensors, n_kv = c.scalar("Q", "the tensor count"), c.scalar("Q", "the metadata count")

    metadata = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        metadata[key] = c.value(c.scalar("I", f"metadata {key!r} type"), f"metadata {key!r}")

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment % 8:
        raise c.fail(f"general.alignment={alignment!r}; it must be a positive multiple of 8")

    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        n_dims = c.scalar("I", f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        ne = [c.scalar("Q", f"tensor {name!r} dimensions") for _ in range(n_dims)]
        type_id, offset = c.scalar("I", f"tensor {name!r} type"), c.scalar("Q", f"tensor {name!r} offset")
        infos.append((name, ne, type_id, offset))

    data_start = -(-c.pos // alignment) * alignment  # the tensor data begins at the next aligned byte
    tensors = {}
    for name, ne, type_id, offset in infos:
        if type_id not in GGML_TYPES:
            kind = OTHER_GGML_TYPES.get(type_id)
            raise c.fail(f"tensor {name!r} has ggml type {type_id}"
                         + (f" ({kind}), which minillm does not decode" if kind else ", an unknown type")
                         + f"; it reads {', '.join(t.name for t in GGML_TYPES.values())}")
        t = GGML_TYPES[type_id]
        if ne[0] % t.block_size:
            raise c.fail(f"tensor {name!r}: rows of {ne[0]} weights are not whole {t.name} blocks "
                         f"of {t.block_size}")
        if name in tensors:
            raise c.fail(f"tensor {name!r} is listed twice")
        if offset % alignment:
            raise c.fail(f"tensor {name!r} starts at offset {offset}, not a multiple of the alignment {alignment}")
        n_bytes = int(np.prod(ne, dtype=object)) // t.block_size * t.type_size
        start = data_start + offset
        if start + n_bytes > len(data):
            raise c.fail(f"tensor {name!r} ({n_bytes:,} bytes at offset {start:,}) runs past the end of the "
                         f"file ({len(data):,} bytes): truncated")
        tensors[name] = TensorInfo(name, tuple(reversed(ne)), type_id, start, n_bytes)
    return GGUFFile(path, version, metadata, tensors, alignment, data_start, data)
