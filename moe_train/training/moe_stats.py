"""Per-step MoE statistics: summed on the device over micro-batches, read on the host only on logged steps."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class MoEStatsAccumulator:
    """Collects `MoELayer.last_stats` of every MoE layer after each micro-batch forward.

    `add` does device-side adds only; `read` is the one host sync of a logged step."""

    def __init__(self, model: nn.Module):
        self.layers = [(block.layer_id, block.moe) for block in model.layers if block.moe is not None]
        self.reset()

    def reset(self) -> None:
        self.loads: dict[int, torch.Tensor] = {}
        self.scalars: dict[int, torch.Tensor] = {}  # layer -> [drop_frac, aux_loss, z_loss, router_entropy] sums
        self.micro_batches = 0

    def add(self) -> None:
        for layer_id, moe in self.layers:
            s = moe.last_stats
            scalars = torch.stack([s.drop_frac, s.aux_loss, s.z_loss, s.router_entropy]).float()
            self.loads[layer_id] = self.loads.get(layer_id, 0) + s.tokens_per_expert
            self.scalars[layer_id] = self.scalars.get(layer_id, 0) + scalars
        self.micro_batches += 1

    def all_reduce(self, group) -> None:
        """Collective over the dp group: token counts summed, scalar statistics averaged over ranks."""
        if group is None or not self.layers:
            return
        size = dist.get_world_size(group)
        for store, scale in ((self.loads, 1.0), (self.scalars, 1.0 / size)):
            for key in sorted(store):
                dist.all_reduce(store[key], group=group)
                store[key].mul_(scale)

    def read(self) -> dict:
        """Means over micro-batches and MoE layers; `expert_load` = each layer's share of assignments per expert."""
        if not self.layers or self.micro_batches == 0:
            return {"aux_loss": 0.0, "z_loss": 0.0, "drop_frac": 0.0, "router_entropy": 0.0, "expert_load": {}}
        means = (torch.stack(list(self.scalars.values())).mean(0) / self.micro_batches).tolist()  # host sync
        load = {str(i): (l / l.sum().clamp_min(1)).tolist() for i, l in self.loads.items()}  # host sync
        return {"aux_loss": means[1], "z_loss": means[2], "drop_frac": means[0], "router_entropy": means[3],
                "expert_load": load}
