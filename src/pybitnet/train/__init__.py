"""Training: the trainer loop, data, schedules, checkpoints, distributed setup, export."""

from .config import TrainConfig, config_from_dict, read_recipe
from .data import TokenDataset
from .errors import CheckpointError, DataError
from .tokenize import TextTokenizer, tokenize_record
from .trainer import TrainResult, train

__all__ = [
    "CheckpointError",
    "DataError",
    "TextTokenizer",
    "TokenDataset",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "read_recipe",
    "tokenize_record",
    "train",
]
