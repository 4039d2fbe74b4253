"""Knowledge distillation (config key `distill`): train the model (typically a dense twin) to match a frozen
teacher (typically a trained MoE) on the same batches (moe_train/training/distill.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class DistillConfig:
    teacher: Optional[str] = None
    """The teacher's weights: our weights file, a checkpoint or a Hugging Face directory (what init.from reads).
    Its vocabulary must equal this run's model.vocab_size. None = no distillation."""

    alpha: float = 0.5
    """Weight of the cross-entropy on the data: loss = alpha x CE + (1 - alpha) x T^2 x KL(teacher || student).
    0 = the teacher's distribution only; typical 0.25-0.5 (Switch Transformer distillation: 0.25)."""

    temperature: float = 2.0
    """T: both distributions softened by T before the KL (Hinton et al. 2015); the T^2 keeps the gradient scale.
    Typical 1-4."""

    teacher_bf16: bool = False
    """Hold the teacher's weights in bfloat16 (router float32): half its memory; logits then carry bf16 rounding."""


def validate_distill_config(cfg: DistillConfig) -> None:
    if cfg.teacher is not None and not str(cfg.teacher).strip():
        raise ValueError(f"distill.teacher={cfg.teacher!r} must be a path (or null: no distillation)")
    if not (isinstance(cfg.alpha, (int, float)) and 0 <= cfg.alpha <= 1):
        raise ValueError(f"distill.alpha={cfg.alpha!r} must be in [0, 1] (the cross-entropy's weight)")
    if not (isinstance(cfg.temperature, (int, float)) and math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(f"distill.temperature={cfg.temperature!r} must be a finite number > 0 (typical 1-4)")
