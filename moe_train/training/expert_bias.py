"""Aux-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437 section 2.1.2): after every optimizer step, each MoE
layer's selection bias moves towards balance,  b_e += rate * sign(mean_e' load_e' - load_e),  where load_e is the
number of token-expert pairs its router chose for expert e during the step (every micro-batch, before capacity
dropping), summed over every data- and expert-parallel rank, so the bias stays identical on all ranks.

Megatron-Core (`get_updated_expert_bias`) applies the same formula; torchtitan (`_update_expert_bias`) also centres
the update to mean zero. Recomputation under activation checkpointing does not disturb it: a recomputed layer counts
its own choices twice, which scales all of its loads alike and leaves every sign unchanged.

Shape legend: L MoE layers with a bias, E experts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe_train.models.moe.layer import MoELayer


class ExpertBiasUpdater:
    """Sums each biased router's choices over the step's micro-batches (`add`, device-side), then `step` updates
    the biases (one all-reduce of [L, E] over the data-parallel group)."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.moes = [m for m in model.modules() if isinstance(m, MoELayer) and m.router.expert_bias is not None]
        self.loads_LE: Optional[torch.Tensor] = None

    @property
    def enabled(self) -> bool:
        return bool(self.moes)

    def add(self) -> None:
        """After a micro-batch's forward: its router choices (MoELayer.last_stats), no host sync."""
        if not self.enabled:
            return
        choices_LE = torch.stack([moe.last_stats.choices_E for moe in self.moes])
        self.loads_LE = choices_LE if self.loads_LE is None else self.loads_LE + choices_LE

    @torch.no_grad()
    def step(self, group: Optional[dist.ProcessGroup]) -> None:
        """After the optimizer step: the loads summed over `group` (collective), each bias moved by rate * sign."""
        if not self.enabled or self.loads_LE is None:
            return
        loads_LE = self.loads_LE
        if group is not None:
            dist.all_reduce(loads_LE, group=group)  # collective: L x E numbers per step
        update_LE = bias_update(loads_LE, self.rate)
        for moe, update_E in zip(self.moes, update_LE):
            moe.router.expert_bias.add_(update_E.to(moe.router.expert_bias.dtype))
        self.loads_LE = None


def bias_update(loads_LE: torch.Tensor, rate: float) -> torch.Tensor:
    """rate * sign(mean load - load) per layer: underloaded experts gain, overloaded ones lose."""
    return rate * torch.sign(loads_LE.mean(dim=-1, keepdim=True) - loads_LE)
