"""A GGUF file's metadata and tensors, read from a memory map.

The header (metadata key/values, then tensor infos) is walked with `struct`; a value is
decoded only when asked for (`GGUFFile.get`), and a tensor's data is a numpy view of the
mapped file. gguf-py's `GGUFReader` instead builds numpy views of every element of every
metadata array up front: on the default model (a 49,152-token vocabulary and its merges,
~200k strings) that took 6.5 s of a 16 s engine start on 2 CPU cores, and the loader opened
the file twice. The `gguf` package still supplies the type tables and the dequantizers.

Format (little-endian, versions 2 and 3): magic "GGUF", version u32, tensor count u64,
key/value count u64; each key/value a string key, a u32 value type and the value (strings
are a u64 length and UTF-8 bytes; arrays an item type u32, a u64 count and the items); each
tensor info a string name, u32 n_dims, n_dims u64 dims (row length first), u32 ggml type
and a u64 offset from the data section, which starts at the next multiple of
`general.alignment` (default 32) after the infos.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = 0x46554747  # b"GGUF" read as a little-endian u32
_STRING, _ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_ITEM_DTYPES = {code: np.dtype(fmt) for code, fmt in _SCALARS.items()}
# tensor types stored as plain numbers (the rest are blocks of bytes)
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader takes."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `shape` in GGUF's order (row length first); `data` as gguf-py's reader
    gives it: numbers of the reversed shape for plain types, else uint8 rows of blocks."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """The metadata and tensors of a GGUF file (kept mapped while any tensor data is used)."""

    def __init__(self, path: str | Path) -> None:
        self._path = str(path)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise GGUFFormatError(f"{path} is not a GGUF file (too short)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self.tensors = self._read_header()
        except (struct.error, UnicodeDecodeError, OverflowError) as e:
            raise GGUFFormatError(f"{path}: truncated or corrupt GGUF header ({e})") from None

    def _read_header(self) -> list[GGUFTensor]:
        if self._u32(0) != _MAGIC:
            raise GGUFFormatError(f"{self._path} is not a GGUF file")
        version = self._u32(4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self._path}: GGUF version {version} is not supported (2 or "
                                  "3; big-endian files are not supported either)")
        tensor_count, kv_count = struct.unpack_from("<QQ", self._map, 8)
        self._values: dict[str, tuple[int, int]] = {}  # key -> (value type, offset)
        off = 24
        for _ in range(kv_count):
            key, off = self._string(off)
            vtype = self._u32(off)
            self._values[key] = (vtype, off + 4)
            off = self._skip(vtype, off + 4)
        infos = []
        for _ in range(tensor_count):
            name, off = self._string(off)
            n_dims = self._u32(off)
            if not 1 <= n_dims <= 4:  # (GGML_MAX_DIMS)
                raise GGUFFormatError(f"{self._path}: tensor {name} has {n_dims} dimensions")
            dims = struct.unpack_from(f"<{n_dims}Q", self._map, off + 4)
            off += 4 + 8 * n_dims
            kind, offset = struct.unpack_from("<IQ", self._map, off)
            off += 12
            infos.append((name, tuple(dims), kind, offset))
        alignment = self.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self._path}: alignment {alignment} is not a power of two")
        start = -(-off // alignment) * alignment
        return [self._tensor(start, *info) for info in infos]

    def get(self, key: str, default: object = None) -> object:
        """A metadata value (a number, bool, str, or list of them), or `default`."""
        entry = self._values.get(key)
        return default if entry is None else self._decode(*entry)[0]

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self._map, off)[0]

    def _string(self, off: int) -> tuple[str, int]:
        (size,) = struct.unpack_from("<Q", self._map, off)
        end = off + 8 + size
        if end > len(self._map):
            raise struct.error(f"a string of {size} bytes at {off} runs past the end")
        return self._map[off + 8:end].decode("utf-8"), end

    def _skip(self, vtype: int, off: int) -> int:
        """Offset just past a value of type vtype at off."""
        if vtype in _SCALARS:
            return off + _ITEM_DTYPES[vtype].itemsize
        if vtype == _STRING:
            return off + 8 + struct.unpack_from("<Q", self._map, off)[0]
        if vtype != _ARRAY:
            raise GGUFFormatError(f"{self._path}: unknown metadata value type {vtype}")
        item, count = struct.unpack_from("<IQ", self._map, off)
        off += 12
        if item in _SCALARS:
            return off + count * _ITEM_DTYPES[item].itemsize
        for _ in range(count):  # strings and nested arrays: one at a time
            off = self._skip(item, off)
        return off

    def _decode(self, vtype: int, off: int) -> tuple[object, int]:
        """The value of type vtype at off, and the offset just past it (`_skip`'s)."""
        if vtype in _SCALARS:
            dtype = _ITEM_DTYPES[vtype]
            return struct.unpack_from(_SCALARS[vtype], self._map, off)[0], off + dtype.itemsize
        if vtype == _STRING:
            return self._string(off)
        item, count = struct.unpack_from("<IQ", self._map, off)
        off += 12
        if item in _SCALARS:
            dtype = _ITEM_DTYPES[item]
            return (np.frombuffer(self._map, dtype, count, off).tolist(),
                    off + count * dtype.itemsize)
        values = []
        for _ in range(count):
            value, off = self._decode(item, off)
            values.append(value)
        return values, off

    def _tensor(self, start: int, name: str, dims: tuple[int, ...], kind: int,
                offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError:
            raise GGUFFormatError(f"{self._path}: tensor {name} has unknown type {kind}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed(dims))
        plain = _PLAIN.get(qtype)
        if plain is None:
            if dims[0] % block:
                raise GGUFFormatError(f"{self._path}: tensor {name}'s rows of {dims[0]} are "
                                      f"not whole blocks of {block}")
            shape = (*shape[:-1], dims[0] // block * type_size)
        dtype = np.dtype(np.uint8 if plain is None else plain)
        count = int(np.prod(shape))
        if start + offset + count * dtype.itemsize > len(self._map):
            raise GGUFFormatError(f"{self._path}: tensor {name} runs past the end of the file")
        data = np.frombuffer(self._map, dtype, count, start + offset).reshape(shape)
        return GGUFTensor(name, qtype, dims, data)
