"""Structured configuration (dataclass schemas) and boundary validation."""

from moe_train.config.moe import MoEConfig, validate_moe_config

__all__ = ["MoEConfig", "validate_moe_config"]
