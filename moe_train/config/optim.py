"""Optimizer and learning-rate schedule (config key `optim`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

SCHEDULES = ("cosine", "linear", "constant")
FUSED = ("auto", "true", "false")


@dataclass
class OptimConfig:
    """torch AdamW; no weight decay on norms, biases and embeddings; linear warm-up, then the decay schedule."""

    lr: float = 3e-3
    """Peak learning rate, reached at the end of warm-up. Tiny models 1e-3-3e-3; Mixtral-scale 1e-4-3e-4."""

    min_lr: float = 3e-4
    """Learning rate at the end of the decay (cosine/linear), kept afterwards. Typically lr / 10."""

    warmup_steps: int = 30
    """Optimizer steps of linear warm-up from 0 to lr."""

    schedule: str = "cosine"
    """Decay after warm-up: `cosine` or `linear` from lr to min_lr over decay_steps, or `constant` (stays at lr)."""

    decay_steps: Optional[int] = None
    """Step at which the decay reaches min_lr (counted from step 0). None = train.max_steps."""

    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (not norms, biases, embeddings). Typical 0.1."""

    beta1: float = 0.9
    """AdamW beta1."""

    beta2: float = 0.95
    """AdamW beta2. 0.95 is the usual LM choice (more stable than 0.999)."""

    eps: float = 1e-8
    """AdamW epsilon."""

    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this value; 0 = no clipping (the norm is still logged)."""

    fused: str = "auto"
    """torch AdamW implementation: `true` = the fused kernel (one launch for all parameters: on CUDA the fastest),
    `false` = torch's default (foreach on CUDA, a loop on CPU), `auto` = fused on CUDA, the default elsewhere (the
    CPU fused kernel exists but is not faster there). Not used under zero.stage >= 0 (DeepSpeed owns the step)."""


def validate_optim_config(cfg: OptimConfig) -> None:
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not supported; allowed: {', '.join(SCHEDULES)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"optim.lr={cfg.lr} must be a positive number")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ValueError(f"optim.min_lr={cfg.min_lr} must be between 0 and optim.lr={cfg.lr}")
    if str(cfg.fused).lower() not in FUSED:
        raise ValueError(f"optim.fused={cfg.fused!r} is not supported; allowed: {', '.join(FUSED)}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} must be >= 0")
    if cfg.decay_steps is not None and cfg.decay_steps <= cfg.warmup_steps:
        raise ValueError(f"optim.decay_steps={cfg.decay_steps} must be > optim.warmup_steps={cfg.warmup_steps}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"optim.{name}={getattr(cfg, name)} must be in [0, 1)")
    for name in ("weight_decay", "grad_clip", "eps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"optim.{name}={getattr(cfg, name)} must be >= 0")
