"""Recipe schema and loading."""

from qtrain.config.load import apply_overrides, load_recipe, recipe_from_dict
from qtrain.config.schema import (
    CheckpointConfig,
    CompareConfig,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    ModelConfig,
    PeftConfig,
    QuantConfig,
    Recipe,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "CompareConfig", "DataConfig", "DistributedConfig", "LoggingConfig", "ModelConfig",
    "PeftConfig", "QuantConfig", "Recipe", "TrainConfig",
    "apply_overrides", "load_recipe", "recipe_from_dict",
]
