"""Model architectures, configs, presets."""

from .config import ModelConfig
from .kv_cache import KVCache
from .transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
