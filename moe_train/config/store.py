"""Registers the config schemas in Hydra's ConfigStore, so every YAML in conf/ is validated against its dataclass.

`base_config` (the root `Config`) is the first default of conf/config.yaml: every composed key is checked against
it, so unknown keys and wrong types fail at compose. YAMLs of the `moe` and `data` groups also name their own
schema (`defaults: [base_<group>, _self_]`) so that they validate when composed on their own.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from moe_train.config.data import DataConfig
from moe_train.config.logging import LoggingConfig
from moe_train.config.moe import MoEConfig
from moe_train.config.schema import Config

SCHEMAS = {"moe": MoEConfig, "data": DataConfig, "logger": LoggingConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name=f"base_{group}", node=schema)
