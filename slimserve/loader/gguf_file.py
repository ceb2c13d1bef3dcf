"""A lean reader of GGUF headers: metadata as plain Python values, tensors as (offset, size).

The `gguf` package's reader builds a numpy view for every part of every field (about a million
objects for a 49k-token vocabulary, seconds of a load); this one walks the header once with
`struct`, decodes a key's value only when it is asked for, and reads tensor bytes with one
`pread` each, so no mapping of the file outlives the load. `gguf` stays the reference: the tests
compare every field and tensor of their files with `gguf.GGUFReader`.

Layout (little- or big-endian, detected from the version): magic "GGUF", version u32 (2 or 3),
tensor count u64, key count u64; keys (string, type u32, value); tensor infos (name, n_dims u32,
dims u64..., type u32, offset u64); padding to `general.alignment`; tensor data.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> (struct code, numpy dtype); 8 is a string, 9 an array.
_SCALARS = {
    0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "u2"), 3: ("h", "i2"), 4: ("I", "u4"),
    5: ("i", "i4"), 6: ("f", "f4"), 7: ("?", "?"), 10: ("Q", "u8"), 11: ("q", "i8"),
    12: ("d", "f8"),
}  # fmt: skip
_STRING, _ARRAY = 8, 9

# ggml tensor types: name, elements a block, bytes a block (ggml.h / gguf.constants).
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}  # fmt: skip


class GGUFFormatError(ValueError):
    """The bytes do not follow the GGUF layout (the message says where)."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-varying dimension first
    type_id: int
    type_name: str
    offset: int  # absolute, in the file
    n_bytes: int


class _Array:
    """An array value not decoded yet: where it lies and how many elements it has."""

    __slots__ = ("item_type", "count", "start", "end")

    def __init__(self, item_type: int, count: int, start: int, end: int):
        self.item_type, self.count, self.start, self.end = item_type, count, start, end


class GGUFFile:
    """The header of a GGUF file. `meta(key)` returns what `gguf`'s `field.contents()` does
    (str, int, float, bool, or a list of them); `tensors` lists the tensor infos in file order;
    `read(t)` returns one tensor's bytes as a fresh uint8 array."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            if self.size < 24:
                raise GGUFFormatError(f"{self.size} bytes is shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                self._parse(m)

    # -- header -----------------------------------------------------------------------------
    def _parse(self, buf) -> None:
        if buf[:4] != MAGIC:
            raise GGUFFormatError(f"magic bytes {bytes(buf[:4])!r}, expected {MAGIC!r}")
        (version,) = struct.unpack_from("<I", buf, 4)
        self.endian = "<"
        if version & 0xFFFF == 0:  # written on a big-endian machine
            self.endian = ">"
            (version,) = struct.unpack_from(">I", buf, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
        self.version = version
        e = self.endian
        n_tensors, n_kv = struct.unpack_from(e + "QQ", buf, 8)
        self._buf, self._pos = buf, 24
        self._values: dict[str, object] = {}
        self.types: dict[str, int] = {}  # key -> its GGUF value type (an array's: 9)
        try:
            for _ in range(n_kv):
                key = self._string()
                (vtype,) = self._unpack("I")
                self.types[key] = vtype
                self._values[key] = self._value(vtype)
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("I")
                shape = self._unpack("Q" * n_dims)
                type_id, offset = self._unpack("IQ")
                infos.append((name, shape, type_id, offset))
        except (struct.error, UnicodeDecodeError, IndexError) as err:
            raise GGUFFormatError(f"header is cut short or garbled near byte {self._pos}") from err
        # Arrays are decoded now (while the mapping is open) only when small; big ones (the
        # vocabulary) are copied out as raw bytes and decoded on first use.
        for key, value in self._values.items():
            if isinstance(value, _Array):
                self._values[key] = _Raw(value, bytes(buf[value.start : value.end]), e)
        alignment = self.meta("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.data_offset = data_start
        self.tensors = [self._tensor(data_start, *i) for i in infos]
        del self._buf

    def _unpack(self, fmt: str) -> tuple:
        fmt = self.endian + fmt
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("Q")
        start = self._pos
        if start + n > len(self._buf):
            raise IndexError(n)
        self._pos += n
        return str(self._buf[start : start + n], "utf-8")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype][0])[0]
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise GGUFFormatError(f"unknown value type {vtype} near byte {self._pos}")
        item_type, count = self._unpack("IQ")
        start = self._pos
        if item_type in _SCALARS:
            self._pos += count * struct.calcsize(_SCALARS[item_type][0])
            if self._pos > len(self._buf):
                raise IndexError(count)
        elif item_type == _STRING:
            # Skip the strings by their lengths: cheap, and nothing decoded until asked for.
            buf, pos, unpack, fmt = self._buf, self._pos, struct.unpack_from, self.endian + "Q"
            for _ in range(count):
                pos += 8 + unpack(fmt, buf, pos)[0]
            if pos > len(buf):
                raise IndexError(count)
            self._pos = pos
        else:  # arrays of arrays: decode in place, they are rare and small
            return [self._value(item_type) for _ in range(count)]
        return _Array(item_type, count, start, self._pos)

    def _tensor(self, data_start, name, shape, type_id, offset) -> TensorInfo:
        if type_id not in GGML_TYPES:
            raise GGUFFormatError(f"tensor {name}: unknown ggml type {type_id}")
        type_name, block, block_bytes = GGML_TYPES[type_id]
        n = 1
        for d in shape:
            n *= d
        if n % block:
            raise GGUFFormatError(f"tensor {name}: {n} elements is not a whole number of blocks")
        return TensorInfo(
            name, tuple(shape), type_id, type_name, data_start + offset, n // block * block_bytes
        )

    # -- access -----------------------------------------------------------------------------
    def meta(self, key: str, default=None):
        value = self._values.get(key, default)
        if isinstance(value, _Raw):
            value = self._values[key] = value.decode()
        return value

    def count(self, key: str) -> int | None:
        """The length of an array value without decoding it (None for a missing key)."""
        value = self._values.get(key)
        if value is None:
            return None
        return value.count if isinstance(value, _Raw) else len(value)

    def keys(self):
        return self._values.keys()

    def read(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes, read into a new array (no mapping of the file is kept)."""
        out = np.empty(t.n_bytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(memoryview(out)) != t.n_bytes:
                raise GGUFFormatError(f"tensor {t.name} is cut short")
        return out


class _Raw:
    """An array's bytes, copied out of the header; `decode` turns them into a list."""

    __slots__ = ("item_type", "count", "data", "endian")

    def __init__(self, array: _Array, data: bytes, endian: str):
        self.item_type, self.count, self.data, self.endian = (
            array.item_type, array.count, data, endian,
        )  # fmt: skip

    def decode(self) -> list:
        if self.item_type in _SCALARS:
            dtype = np.dtype(_SCALARS[self.item_type][1]).newbyteorder(self.endian)
            return np.frombuffer(self.data, dtype=dtype, count=self.count).tolist()
        out, data, pos = [], self.data, 0
        fmt = self.endian + "Q"
        unpack = struct.unpack_from
        for _ in range(self.count):
            (n,) = unpack(fmt, data, pos)
            pos += 8
            out.append(str(data[pos : pos + n], "utf-8"))
            pos += n
        return out


def copy_vocabulary(writer, src: str) -> int:
    """Write the byte-level BPE vocabulary of GGUF file `src` (tokens, types, merges) into a
    `gguf.GGUFWriter`, with EOS id 2; returns the vocabulary's size. For models written in tests
    and benchmarks that borrow the default model's tokenizer."""
    f = GGUFFile(src)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(f.meta("tokenizer.ggml.pre"))
    writer.add_token_list(f.meta("tokenizer.ggml.tokens"))
    writer.add_token_types(f.meta("tokenizer.ggml.token_type"))
    writer.add_token_merges(f.meta("tokenizer.ggml.merges"))
    writer.add_eos_token_id(2)
    return f.count("tokenizer.ggml.tokens")
