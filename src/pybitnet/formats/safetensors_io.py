"""Memory-mapped safetensors reading (single file or sharded index) with validated errors."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import WeightsError
from .config_json import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, from the sharded index or the single model.safetensors."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} has no 'weight_map' object naming the shard of each tensor")
        files = {name: model_dir / str(shard) for name, shard in weight_map.items()}
        for path in set(files.values()):
            if path.resolve().parent != model_dir.resolve():
                raise WeightsError(f"{index} names a shard outside the model directory: {path.name}")
            if not path.is_file():
                raise WeightsError(f"shard {path.name} listed in {index.name} is missing from {model_dir}")
        return files
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return dict.fromkeys(_open(single).keys(), single)
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise WeightsError(
            f"no weights in {model_dir}: expected {SINGLE_NAME}, {INDEX_NAME} with its shards, "
            "or *.safetensors"
        )
    return {name: path for path in shards for name in _open(path).keys()}  # noqa: SIM118 (not a dict)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(
            f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt: "
            "download or write it again"
        ) from None


# safetensors dtype names -> torch dtypes
TORCH_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _data_offsets(path: Path) -> tuple[int, dict[str, Any]]:
    """(absolute offset of the data section, the header) of a safetensors file that safe_open accepted."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return 8 + size, json.loads(f.read(size))


class TensorReader:
    """Reads tensors by name across shards. `get` returns views of the memory-mapped files (no copy); `read`
    returns a private copy read with file I/O, for tensors that are converted at load anyway."""

    def __init__(self, model_dir: Path) -> None:
        self.files = weight_files(model_dir)
        self._handles = {path: _open(path) for path in set(self.files.values())}
        self._headers: dict[Path, tuple[int, dict[str, Any]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def _file(self, name: str) -> Path:
        if name not in self.files:
            raise WeightsError(f"tensor {name!r} is missing from the checkpoint")
        return self.files[name]

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name such as "U8" or "BF16", shape) of a tensor, without reading its data."""
        path = self._file(name)
        try:
            info = self._handles[path].get_slice(name)
            return info.get_dtype(), tuple(info.get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"cannot read tensor {name!r} from {path.name}: {e}") from None

    def get(self, name: str) -> torch.Tensor:
        path = self._file(name)
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"cannot read tensor {name!r} from {path.name}: {e}") from None

    def read(self, name: str) -> torch.Tensor:
        """A private copy of tensor `name`. Its file pages are never mapped into this process, so converting
        it (repacking, ternarizing, casting) leaves no trace in resident memory once the copy is freed."""
        return self.read_rows(name, 0, None)

    def read_rows(self, name: str, start: int, stop: int | None) -> torch.Tensor:
        """A private copy of rows [start, stop) (along the first dimension) of tensor `name`, read like
        `read`, so a large tensor can be converted a block at a time."""
        dtype, shape = self.header(name)
        path = self.files[name]
        if dtype not in TORCH_DTYPES:
            raise WeightsError(
                f"tensor {name!r} in {path.name} has dtype {dtype}, which pybitnet does not read"
            )
        if path not in self._headers:
            self._headers[path] = _data_offsets(path)
        start_of_data, header = self._headers[path]
        begin, end = header[name]["data_offsets"]
        row_bytes = math.prod(shape[1:]) * TORCH_DTYPES[dtype].itemsize
        if end - begin != row_bytes * math.prod(shape[:1]):
            raise WeightsError(
                f"tensor {name!r} in {path.name}: {end - begin} bytes do not hold {dtype} {shape}"
            )
        if shape:
            rows = range(shape[0])[start:stop]
            start, shape = rows.start, (len(rows), *shape[1:])
            begin += start * row_bytes
        out = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray()
        with path.open("rb") as f:
            f.seek(start_of_data + begin)
            if f.readinto(buffer) != len(buffer):
                raise WeightsError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
        return out
