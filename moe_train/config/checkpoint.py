"""Checkpointing (config key `checkpoint`): sharded, atomic, verified checkpoints in <run dir>/checkpoints
(moe_train/checkpoint/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many optimizer steps (and at train.max_steps) into <run dir>/checkpoints/step_XXXXXXXX;
    0 = never. Typical: a few hundred to a few thousand steps (each save costs one write of weights + 2x optimizer
    state, ~12 bytes per parameter in float32)."""

    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete. >= 1."""

    resume: str = "none"
    """`none`; `auto` = the newest complete checkpoint in this run directory that verifies (falling back past broken
    ones; a fresh start if there is none); or the path of a step_XXXXXXXX checkpoint directory."""


def validate_checkpoint_config(cfg: CheckpointConfig) -> None:
    if cfg.every < 0:
        raise ValueError(f"checkpoint.every={cfg.every} must be >= 0 (0 = never save)")
    if cfg.keep_last < 1:
        raise ValueError(f"checkpoint.keep_last={cfg.keep_last} must be >= 1")
    if not isinstance(cfg.resume, str) or not cfg.resume.strip():
        raise ValueError(f"checkpoint.resume={cfg.resume!r} must be 'none', 'auto' or a checkpoint directory")
