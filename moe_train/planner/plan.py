"""A layout's memory and communication plan, per rank: states (states.py) around one profiled micro-batch
(profile.py).

Peak model, per rank:

    total = parameters + optimizer state + max(activations + gradients alive then,  gradients + step temporaries)

The first term of the max is the forward/backward peak: activations measured on fake tensors, with the fraction of
the gradients that exist at that moment (backward frees activations as it creates gradients; with
train.grad_accum_steps > 1 the previous micro-batches' gradients are all there). The second is the optimizer step,
when activations are gone. The sum of the four figures would overstate a step that does not accumulate by up to the
smaller of activations and gradients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moe_train.config.parallel import ParallelDims
from moe_train.config.schema import Config
from moe_train.models.params import count_parameters, flops_per_token
from moe_train.models.transformer import Transformer
from moe_train.planner.profile import StepProfile, fake_world, profile_step
from moe_train.planner.states import StateBytes, StateLayout, state_bytes
from moe_train.training.optim import use_fused

GIB = 2 ** 30


@dataclass(frozen=True)
class RankPlan:
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Plan:
    layout: str
    world: int
    engine: str
    params_total: int
    params_active: int
    per_rank: RankPlan
    a2a_bytes_per_step: int
    flops_per_token: int
    gpu_mem_bytes: int
    fits: bool

    def to_json(self) -> dict:
        return asdict(self)


def engine_of(cfg: Config, device: torch.device) -> StateLayout:
    return StateLayout(cfg.zero.stage, cfg.fsdp.enabled, cfg.fsdp.reshard_after_forward,
                       cfg.train.mixed_precision == "bf16", cfg.zero.reduce_bucket_size, use_fused(cfg.optim, device))


def layout_name(cfg: Config, dims: ParallelDims, engine: StateLayout) -> str:
    t = cfg.train
    return (f"dp {dims.dp} (edp {dims.edp}) x ep {dims.ep} x tp {dims.tp}, {engine.name}, AC "
            f"{t.activation_checkpointing}, {t.mixed_precision}, micro-batch {micro_batch_size(cfg, dims)} x "
            f"{t.seq_len}")


def micro_batch_size(cfg: Config, dims: ParallelDims) -> int:
    return cfg.train.batch_size // (cfg.train.grad_accum_steps * dims.dp)


def rank_plan(states: StateBytes, profile: StepProfile, accum_steps: int) -> RankPlan:
    grads_then = states.grad_bytes if accum_steps > 1 else profile.grad_fraction * states.grad_bytes
    peak = max(profile.activation_bytes + grads_then, states.grad_bytes + states.step_temp_bytes)
    total = states.param_bytes + states.optimizer_bytes + int(peak)
    return RankPlan(states.params, states.param_bytes, states.grad_bytes, states.optimizer_bytes,
                    profile.activation_bytes, total)


def plan_layout(cfg: Config, dims: ParallelDims, gpu_mem_gib: float, reserve_gib: float = 2.0,
                device: torch.device = torch.device("cuda"), rank: int = 0) -> Plan:
    """The plan of `rank` (rank 0: every rank holds the same shapes, FSDP2's uneven rows rounded up) of a
    validated config; `reserve_gib` of the device is kept for the CUDA context, NCCL and allocator slack."""
    engine = engine_of(cfg, device)
    with fake_world(rank, dims.world_size, dims) as ctx:
        profile = profile_step(cfg, ctx, micro_batch_size(cfg, dims), weights_bf16=engine.fsdp and engine.bf16)
    per_rank = rank_plan(state_bytes(profile.params, engine, dims.dp, dims.edp), profile, cfg.train.grad_accum_steps)
    with torch.device("meta"):
        whole = Transformer(cfg.model, cfg.moe)
    counts, gpu_mem = count_parameters(whole), int(gpu_mem_gib * GIB)
    return Plan(layout_name(cfg, dims, engine), dims.world_size, engine.name, counts.total, counts.active, per_rank,
                profile.a2a_bytes * cfg.train.grad_accum_steps, flops_per_token(whole, cfg.train.seq_len), gpu_mem,
                per_rank.total_bytes <= gpu_mem - reserve_gib * GIB)
