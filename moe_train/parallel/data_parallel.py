"""Gradient reduction for data parallelism with sharded experts.

The objective is the mean of the dp ranks' losses. A dense parameter's gradient is the mean over the dp group. An
expert's gradient on its owner already sums the contributions of every ep rank's tokens (they reached it through
the all-to-all), so it is summed over the expert-data-parallel group (the replicas of that expert shard) and divided
by dp, not averaged over edp: averaging would count each ep rank's tokens ep times too little or too much (the
"doubled gradients at EP=2" bug).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_train.models.shard_spec import shard_specs


def split_expert_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters; expert = the stacked weights of routed experts."""
    specs = shard_specs(model)
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if specs[name].expert else dense).append(p)
    return dense, expert


def _all_reduce_flat(grads: list[torch.Tensor], group: dist.ProcessGroup | None, scale: float) -> None:
    """Collective (when group is not None): one bucket, SUM, then scale in place."""
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    if group is not None:
        dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def reduce_gradients(model: nn.Module, dp_group, edp_group, dp: int) -> None:
    """Dense grads: mean over dp. Expert grads: sum over edp, divided by dp. Missing grads count as zero."""
    if dp == 1:
        return
    dense, expert = split_expert_params(model)
    for p in dense + expert:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_flat([p.grad for p in dense], dp_group, 1.0 / dp)
    _all_reduce_flat([p.grad for p in expert], edp_group, 1.0 / dp)


def _squares_by_partition(model: nn.Module) -> tuple[dict[tuple[str, ...], torch.Tensor], list[torch.Tensor]]:
    """Sum of squared gradient entries per partition key (the sorted mesh dims a parameter is split over; float32,
    on the gradients' device), and all gradients."""
    specs = shard_specs(model)
    by_key: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # FSDP2: this rank's rows
            by_key.setdefault(tuple(sorted(specs[name].over)), []).append(grad)
    # One fused norm kernel per key instead of a pow and a sum per parameter.
    sums = {key: torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).pow(2).sum()
            for key, grads in by_key.items()}
    return sums, [g for grads in by_key.values() for g in grads]


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, groups) -> torch.Tensor:
    """Global L2 norm of all gradients and torch's clipping rule: scale by min(1, max_norm / (norm + 1e-6)).
    Squares of partitioned parameters are summed over their groups (collectives); replicated ones count once.
    Call after `reduce_gradients`. max_norm <= 0: no clipping (the norm is still returned)."""
    sums, grads = _squares_by_partition(model)
    if not sums:  # no parameter has a gradient (every rank agrees: the model is the same everywhere)
        return torch.zeros((), device=next(model.parameters()).device)
    for key in sorted(sums):
        for name in key:
            group = getattr(groups, name) if groups is not None else None
            if group is not None:
                dist.all_reduce(sums[key], group=group)  # collective
    norm = torch.stack([sums[key] for key in sorted(sums)]).sum().sqrt()
    if max_norm > 0:
        torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm
