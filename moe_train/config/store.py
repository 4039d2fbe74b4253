"""Registers the config schemas in Hydra's ConfigStore, so every YAML in conf/ is validated against its dataclass.

Each YAML of a group starts with `defaults: [base_<group>, _self_]`: unknown keys and wrong types fail at compose.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moe_train.config.moe import MoEConfig

SCHEMAS = {"moe": MoEConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
