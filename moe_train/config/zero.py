"""DeepSpeed ZeRO (config key `zero`): -1 keeps our own DDP-style gradient reduction; 0-3 train through
`deepspeed.initialize` with that ZeRO stage (see moe_train/parallel/zero.py for how experts are handed over).

    zero.stage=2 parallel.ep=2     # dense optimizer state and gradients split over dp, experts' over edp
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES = (-1, 0, 1, 2, 3)


@dataclass
class ZeroConfig:
    stage: int = -1
    """-1 = DeepSpeed not used (gradients all-reduced by moe_train itself). 0 = DeepSpeed engine, nothing
    partitioned; 1 = optimizer state partitioned; 2 = + gradients; 3 = + parameters (not with parallel.ep > 1).
    Dense state is split over the data-parallel group (dp ranks), expert state over the expert-data-parallel group
    (dp / ep ranks)."""

    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduction bucket (DeepSpeed's zero_optimization.reduce_bucket_size; its default 5e8).
    Smaller buckets overlap better and need less buffer memory; 5e7-5e8 is typical."""

    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket after the step, stages 1-2 (DeepSpeed's default 5e8)."""

    param_persistence_threshold: int = 100_000
    """ZeRO 3: parameters with fewer elements than this stay whole on every rank (not partitioned, no gather per
    use); DeepSpeed's stage3_param_persistence_threshold, default 1e5. 0 partitions every parameter."""


def validate_zero_config(cfg: ZeroConfig, ep: int, tp: int, world_size: int) -> None:
    """Boundary checks that need only the config and the world size (raised before the layout is resolved)."""
    if cfg.stage not in STAGES:
        raise ValueError(f"zero.stage={cfg.stage} is not supported; allowed: {', '.join(map(str, STAGES))} "
                         f"(-1 = DeepSpeed not used)")
    if cfg.stage < 0:
        return
    if tp > 1:
        raise ValueError(f"zero.stage={cfg.stage} with parallel.tp={tp} is not supported yet (no DeepSpeed mpu); "
                         f"allowed: parallel.tp=1, or zero.stage=-1 with tensor parallelism")
    if world_size < 2:
        raise ValueError(f"zero.stage={cfg.stage} needs a distributed launch (world size {world_size}); allowed: "
                         f"zero.stage=-1 on one process, or launch >= 2 ranks with torchrun/deepspeed")
    for name in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"zero.{name}={getattr(cfg, name)} must be >= 1 (elements)")
    if cfg.param_persistence_threshold < 0:
        raise ValueError(f"zero.param_persistence_threshold={cfg.param_persistence_threshold} must be >= 0 (elements)")
