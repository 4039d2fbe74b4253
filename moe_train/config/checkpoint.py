"""Checkpointing (config key `checkpoint`). Saving and resuming land with the sharded-checkpoint work (issue 5);
until then only the defaults (no checkpoints) are accepted, so no run silently skips a save it was asked for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many optimizer steps into <run dir>/checkpoints; 0 = never."""

    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""

    resume: str = "none"
    """`none`, `auto` (newest complete checkpoint in the run directory) or a checkpoint path."""


def validate_checkpoint_config(cfg: CheckpointConfig) -> None:
    if cfg.every < 0 or cfg.keep_last < 1:
        raise ValueError(f"checkpoint.every={cfg.every} must be >= 0 and checkpoint.keep_last={cfg.keep_last} >= 1")
    if cfg.every > 0 or cfg.resume != "none":
        raise ValueError(f"checkpoint.every={cfg.every}, checkpoint.resume={cfg.resume!r}: saving and resuming "
                         f"checkpoints is not available in this version; allowed: checkpoint.every=0, resume=none")
