"""Structured configuration (dataclass schemas registered in Hydra's ConfigStore) and boundary validation."""

from moe_train.config.moe import MoEConfig, validate_moe_config
from moe_train.config.store import register_configs

__all__ = ["MoEConfig", "register_configs", "validate_moe_config"]
