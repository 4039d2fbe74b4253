"""AdamW with decay on matrices only, and the warm-up + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_train.config.optim import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices (attention, FFN, experts, router, LM head); none on norms, biases and
    embeddings (decaying an embedding pulls rare tokens to zero). A tied LM head follows the embedding."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_fused(cfg: OptimConfig, device: torch.device) -> bool:
    """optim.fused: `auto` = the fused kernel on CUDA (one launch for every parameter), foreach elsewhere."""
    choice = str(cfg.fused).lower()
    return device.type == "cuda" if choice == "auto" else choice == "true"


def build_optimizer(model: nn.Module, cfg: OptimConfig,
                    device: torch.device = torch.device("cpu")) -> torch.optim.AdamW:
    """torch AdamW over `param_groups`; fused per `use_fused`, else torch's default (foreach on CUDA)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=use_fused(cfg, device) or None)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up to lr over warmup_steps, then cosine/linear
    decay to min_lr at decay_steps (default max_steps), min_lr afterwards; `constant` stays at lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else max_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - cfg.min_lr) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
