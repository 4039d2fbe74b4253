"""Structured configuration (dataclass schemas registered in Hydra's ConfigStore) and boundary validation."""

from moe_train.config.checkpoint import CheckpointConfig
from moe_train.config.data import DataConfig
from moe_train.config.logging import LoggingConfig
from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig, validate_moe_config
from moe_train.config.optim import OptimConfig
from moe_train.config.parallel import ParallelConfig
from moe_train.config.schema import Config, validate_config
from moe_train.config.store import register_configs
from moe_train.config.train import TrainConfig

__all__ = ["CheckpointConfig", "Config", "DataConfig", "LoggingConfig", "ModelConfig", "MoEConfig", "OptimConfig",
           "ParallelConfig", "TrainConfig", "register_configs", "validate_config", "validate_moe_config"]
