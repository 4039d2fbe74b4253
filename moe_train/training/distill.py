"""Distillation: a frozen teacher's logits on the student's batches, and the combined loss (config key `distill`).

loss = alpha x CE(student, data) + (1 - alpha) x T^2 x KL(softmax(teacher / T) || softmax(student / T)),
both terms averaged over the counted target positions (instruction data: response tokens only). The teacher is
built whole on every rank (data parallelism: each rank distils its own micro-batches), in eval mode (eval capacity
factor, no router noise), without gradients, in float32 or bf16 weights; its routing statistics never reach the
student's metrics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moe_train.config.distill import DistillConfig
from moe_train.config.init import init_config
from moe_train.interop.initial import load_from_source, open_source
from moe_train.models.transformer import Transformer, build_model


class Teacher:
    def __init__(self, cfg: DistillConfig, vocab_size: int, device: torch.device, seed: int, say=print):
        source = open_source(cfg.teacher)
        if source.model_cfg.vocab_size != vocab_size:
            raise ValueError(f"distill.teacher={cfg.teacher!r} has vocabulary {source.model_cfg.vocab_size}, this "
                             f"run's model.vocab_size={vocab_size}: the distributions must be over the same tokens")
        self.model = build_teacher(source, device, seed, cfg.teacher_bf16)
        self.cfg = cfg
        say(f"distilling from {source.kind} {source.path} (alpha {cfg.alpha}, temperature {cfg.temperature})")

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model(inputs, task_ids_BS=task_ids)


def build_teacher(source, device: torch.device, seed: int, bf16: bool) -> Transformer:
    model = build_model(source.model_cfg, source.moe_cfg, device, seed=seed)
    load_from_source(model, source, init_config(source.path), seed, lambda message: None)
    if bf16:
        model.to(torch.bfloat16)
        for moe in model.moe_layers():
            moe.router.float()
    model.requires_grad_(False)
    return model.eval()


def distill_kl(student_BSV: torch.Tensor, teacher_BSV: torch.Tensor, counted_BS: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """T^2 x mean over counted positions of KL(softmax(teacher / T) || softmax(student / T)), float32."""
    log_s = F.log_softmax(student_BSV.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_BSV.float() / temperature, dim=-1)
    kl_BS = (log_t.exp() * (log_t - log_s)).sum(-1)
    return temperature ** 2 * (kl_BS * counted_BS).sum() / counted_BS.sum().clamp_min(1)
