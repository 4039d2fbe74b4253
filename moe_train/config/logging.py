"""Experiment logging (config key `logger`; `logger=wandb` selects conf/logger/wandb.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

BACKENDS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggingConfig:
    """metrics.jsonl in the run directory is always written (rank 0); a backend mirrors the same records."""

    backend: str = "none"
    """`none` (null logger) or `wandb`."""

    project: str = "moe_train"
    """wandb project."""

    run_name: Optional[str] = None
    """wandb run name; None = the run directory's name."""

    mode: str = "offline"
    """wandb mode: `offline` (default: works with no network; `wandb sync` later), `online`, `disabled`."""


def validate_logging_config(cfg: LoggingConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"logger.backend={cfg.backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    if cfg.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.mode!r} is not supported; allowed: {', '.join(WANDB_MODES)}")
