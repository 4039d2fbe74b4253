"""`parallelize`: the one place where a model built for one process is turned into this rank's part of the
layout, in a fixed order: tensor parallelism, then expert parallelism (they split different dimensions of the
expert stacks: tp the width F, ep the expert dimension E), then the data-parallel group of a global-batch
balancing loss (installed in the dispatchers ep chose), then activation checkpointing, then torch.compile of
each block (last: it compiles the sharded blocks with their installed dispatchers and checkpoints).

It runs on the meta device in the Trainer (sharded construction: only shapes are cut, and each rank then allocates
and initialises its part; models/init.py), and equally on a materialised model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_train.config.schema import Config
from moe_train.models.param_groups import freeze
from moe_train.models.shard_spec import shard_specs
from moe_train.parallel.activation_checkpoint import apply_ac
from moe_train.parallel.compile import apply_compile
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.expert_parallel import CommCounter, apply_batch_scope, apply_ep
from moe_train.parallel.tensor_parallel import apply_tp


def parallelize(model: nn.Module, ctx: ParallelContext, cfg: Config, counter: CommCounter) -> None:
    groups = ctx.groups
    apply_tp(model, groups.tp if groups else None, ctx.tp_rank, ctx.dims.tp, cfg.parallel.expert_tp)
    apply_ep(model, groups.ep if groups else None, ctx.ep_rank, ctx.dims.ep, counter)
    apply_batch_scope(model, groups.dp if groups else None, cfg.moe.aux_loss_scope)
    apply_ac(model, cfg.train.activation_checkpointing)
    apply_compile(model, cfg.train.compile)
    if cfg.fsdp.enabled:
        from moe_train.parallel.fsdp import apply_fsdp  # imports the trainer's engine module: only when used

        apply_fsdp(model, ctx, cfg.train.mixed_precision == "bf16", cfg.fsdp.reshard_after_forward,
                   sum_only=dist.get_backend() == "gloo")


def shard_for_training(model: nn.Module, ctx: ParallelContext, cfg: Config, counter: CommCounter) -> None:
    """What the Trainer does to the meta model before allocating it: finetune.freeze (before FSDP2 and ZeRO record
    which parameters train), then `parallelize`. The planner's profile and dry run do the same."""
    freeze(model, cfg.finetune.freeze)
    parallelize(model, ctx, cfg, counter)  # collective under FSDP (mesh look-ups)


def full_state_dict(model: nn.Module, ctx: ParallelContext) -> dict:
    """Collective: the state dict one process would hold (see gather_full)."""
    state = model.state_dict()
    if ctx.groups is None:
        return state
    return {**state, **gather_full(model, ctx, {name: p.detach() for name, p in model.named_parameters()})}


def gather_full(model: nn.Module, ctx: ParallelContext, tensors: dict[str, torch.Tensor]) -> dict:
    """Collective: each rank's piece of parameter-shaped tensors (weights, gradients) made whole: FSDP2's dp/edp
    rows gathered first (they were cut last), then tp-split weights along their split dim and expert stacks
    along E over ep."""
    specs, full = shard_specs(model), {}
    for name, t in tensors.items():
        spec = specs[name]
        if hasattr(t, "full_tensor"):  # FSDP2's DTensor
            t = t.full_tensor()  # collective
        if "tp" in spec.over:
            t = _gather(t, spec.tp_dim, ctx.groups.tp)
        if "ep" in spec.over:
            t = _gather(t, 0, ctx.groups.ep)
        full[name] = t
    return full


def _gather(t: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Collective: every rank's `t` concatenated along `dim`, in rank order."""
    moved = t.movedim(dim, 0).contiguous()
    full = moved.new_empty((moved.shape[0] * dist.get_world_size(group), *moved.shape[1:]))
    dist.all_gather_single(full, moved, group=group)
    return full.movedim(0, dim).contiguous()
