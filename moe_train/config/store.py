"""Registers the config schemas in Hydra's ConfigStore, so every YAML in conf/ is validated against its dataclass.

`base_config` (the root `Config`) is the first default of conf/config.yaml: every composed key, from any group
preset or override, is checked against it, so unknown keys and wrong types fail at compose. Group presets do not
name a schema of their own: one would reset the group to the dataclass defaults, undoing what a model preset set.
"""

from __future__ import annotations

from moe_train.config.schema import Config


def register_configs() -> None:
    # Imported here, not at module level: `moe_train.config` must import without hydra-core, on offline GPU nodes
    # that have only CUDA torch (`make gpu-check`, moe_train/gpu_check.py).
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
