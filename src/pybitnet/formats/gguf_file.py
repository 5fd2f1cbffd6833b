"""GGUF files: header, metadata and tensor directory, parsed with every count, size and offset checked.

A parser of our own rather than gguf.GGUFReader: that reader rejects bitnet.cpp's I2_S tensors (type 36, which
mainline ggml does not define) and fails on damaged files with untyped errors. Every problem here is a
WeightsError naming the file. Tensor data are views of one read-only memory map, not copies.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import WeightsError
from ..quant.layouts.i2s import i2s_nbytes

GGUF_MAGIC = b"GGUF"
I2_S = 36  # bitnet.cpp's type id; mainline ggml leaves 36 unassigned
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ENTRIES = 1 << 24  # tensors, metadata keys: far above any real model, below what would exhaust memory

# GGUF metadata value types: id -> struct format (None: string / array, read separately)
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the directory. `shape` is in numpy order (outermost first: GGUF's dims reversed),
    `offset` is absolute in the file."""

    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(type_id: int) -> str:
    if type_id == I2_S:
        return "I2_S"
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def tensor_nbytes(name: str, shape: tuple[int, ...], type_id: int) -> int:
    """Bytes of a tensor of this shape and GGML type (I2_S: n / 4 codes plus its 32-byte scale tail)."""
    n = int(np.prod(shape, dtype=object)) if shape else 1
    if type_id == I2_S:
        return i2s_nbytes(n)
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise WeightsError(f"tensor {name!r} has GGML type {type_id}, which pybitnet cannot read") from None
    if shape and shape[-1] % block:
        raise WeightsError(
            f"tensor {name!r}: its row length {shape[-1]} is not a multiple of {type_name(type_id)}'s "
            f"block size {block}"
        )
    return n // block * size


class _Cursor:
    """Sequential little-endian reads from the mapped file, each checked against its end."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise WeightsError(
                f"{self.path} is truncated or corrupt: reading {what} at byte {self.pos} needs {n} bytes, "
                f"the file has {len(self.buf)}"
            )
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        data = self.take(self.scalar("Q", what), what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise WeightsError(f"{self.path}: {what} is not valid UTF-8") from None

    def count(self, what: str, min_item_bytes: int = 1) -> int:
        n = self.scalar("Q", what)
        if n > MAX_ENTRIES or n * min_item_bytes > len(self.buf) - self.pos:
            raise WeightsError(f"{self.path} is truncated or corrupt: {what} is {n}, more than it holds")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            item_type = self.scalar("I", what)
            if item_type in _SCALAR_FORMATS:
                fmt = "<" + _SCALAR_FORMATS[item_type]
                n = self.count(what, struct.calcsize(fmt))
                raw = self.take(n * struct.calcsize(fmt), what)
                return np.frombuffer(raw, dtype=np.dtype(fmt)).tolist()
            n = self.count(what, 8 if item_type == _STRING else 1)
            return [self.value(item_type, what, depth + 1) for _ in range(n)]
        raise WeightsError(f"{self.path} is corrupt: {what} has unknown value type {vtype}")


class GGUFFile:
    """A parsed GGUF file: `metadata` (key -> value), `tensors` (name -> TensorInfo) and their data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise WeightsError(f"cannot open GGUF file {self.path}: {e}") from None
        self._map = np.frombuffer(self._mmap, dtype=np.uint8)
        cur = _Cursor(self._mmap, self.path)
        if cur.take(4, "the magic number") != GGUF_MAGIC:
            raise WeightsError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        version = cur.scalar("I", "the version")
        if version not in (2, 3):
            raise WeightsError(
                f"{self.path}: GGUF version {version} is not supported (2 and 3 are; "
                "a huge number means a big-endian file)"
            )
        n_tensors = cur.count("the tensor count", 8 + 4 + 4 + 8)
        n_kv = cur.count("the metadata count", 8 + 4)
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            self.metadata[key] = cur.value(cur.scalar("I", f"the type of {key!r}"), f"metadata {key!r}")
        infos = [self._tensor_info(cur) for _ in range(n_tensors)]
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise WeightsError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, rel in infos:
            if name in self.tensors:
                raise WeightsError(f"{self.path} is corrupt: tensor {name!r} is listed twice")
            nbytes = tensor_nbytes(name, shape, type_id)
            offset = data_start + rel
            if rel % alignment or offset + nbytes > len(self._map):
                raise WeightsError(
                    f"{self.path} is truncated or corrupt: tensor {name!r} ({nbytes} bytes at offset "
                    f"{offset}) lies outside the file ({len(self._map)} bytes) or is misaligned"
                )
            self.tensors[name] = TensorInfo(name, shape, type_id, offset, nbytes)

    def _tensor_info(self, cur: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string("a tensor name")
        n_dims = cur.scalar("I", f"the rank of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise WeightsError(f"{self.path} is corrupt: tensor {name!r} has {n_dims} dimensions")
        dims = [cur.scalar("Q", f"the shape of {name!r}") for _ in range(n_dims)]
        if any(d <= 0 or d > len(self._map) * 8 for d in dims):
            raise WeightsError(f"{self.path} is corrupt: tensor {name!r} has shape {dims}")
        type_id = cur.scalar("I", f"the type of {name!r}")
        offset = cur.scalar("Q", f"the offset of {name!r}")
        return name, tuple(reversed(dims)), type_id, offset

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise WeightsError(f"{self.path} has no general.architecture key")
        return arch

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise WeightsError(f"tensor {name!r} is missing from {self.path}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view of the mapped file."""
        t = self.info(name)
        return self._map[t.offset : t.offset + t.nbytes]

    def floats(self, name: str) -> np.ndarray:
        """A float tensor (F32, F16, BF16, or a ggml block type the gguf package dequantizes) as float32."""
        t = self.info(name)
        return _decode_floats(t, self.raw(name), t.shape)

    def read_bytes(self, name: str, start: int = 0, size: int | None = None) -> np.ndarray:
        """`size` bytes of the tensor from byte `start` on (all of it by default), a private copy read with
        file I/O: the file's pages go through the page cache but are never mapped into this process, so
        data converted at load leaves nothing resident once the copy is freed."""
        t = self.info(name)
        size = t.nbytes - start if size is None else size
        with open(self.path, "rb") as fh:
            fh.seek(t.offset + start)
            data = fh.read(size)
        if len(data) != size:
            raise WeightsError(f"{self.path} changed while it was read: {name!r} is cut short")
        return np.frombuffer(data, dtype=np.uint8)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) (along the first dimension) of a float tensor as float32, read like `read_bytes`
        reads."""
        t = self.info(name)
        rows = range(t.shape[0])[start:stop]
        row_bytes = t.nbytes // t.shape[0]  # a ggml row is whole blocks
        raw = self.read_bytes(name, rows.start * row_bytes, len(rows) * row_bytes)
        return _decode_floats(t, raw, (len(rows), *t.shape[1:]))

    def view16(self, name: str) -> np.ndarray | None:
        """An F16 tensor as float16, a BF16 one as its uint16 bit patterns: read-only views of the mapped
        file, no copy; None for other types."""
        t = self.info(name)
        if t.type in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dtype = np.float16 if t.type == GGMLQuantizationType.F16 else np.uint16
            return self.raw(name).view(dtype).reshape(t.shape)
        return None


def _decode_floats(t: TensorInfo, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The values of `raw`, bytes of tensor `t` holding `shape`, as float32."""
    if t.type == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if t.type == GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    if t.type == GGMLQuantizationType.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t.type == I2_S:
        raise WeightsError(f"tensor {t.name!r} is I2_S (ternary) where floating-point values are expected")
    from gguf.quants import dequantize

    try:
        return dequantize(np.asarray(raw).reshape(*shape[:-1], -1), GGMLQuantizationType(t.type))
    except NotImplementedError:
        raise WeightsError(f"tensor {t.name!r}: pybitnet cannot dequantize {t.type_name}") from None
