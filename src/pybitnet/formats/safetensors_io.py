"""Memory-mapped safetensors reading (single file or sharded index) with validated errors."""

from __future__ import annotations

from pathlib import Path

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


class TensorReader:
    """Reads tensors by name across shards; the tensors are views of memory-mapped files, not copies."""

    def __init__(self, model_dir: Path) -> None:
        self.files = weight_files(model_dir)
        self._handles = {path: _open(path) for path in set(self.files.values())}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def header(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype name such as "U8" or "BF16", shape) of a tensor, without reading its data."""
        if name not in self.files:
            raise WeightsError(f"tensor {name!r} is missing from the checkpoint")
        info = self._handles[self.files[name]].get_slice(name)
        return info.get_dtype(), tuple(info.get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise WeightsError(f"tensor {name!r} is missing from the checkpoint")
        try:
            return self._handles[self.files[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"cannot read tensor {name!r} from {self.files[name].name}: {e}") from None
