"""Parallel layout (config key `parallel`): world = dp x tp, experts sharded over ep ranks (ep divides dp)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp: int = -1
    """Data-parallel size; -1 = inferred as world_size / tp."""

    ep: int = 1
    """Expert-parallel size: experts are split over ep ranks of the data-parallel group; must divide dp."""

    tp: int = 1
    """Tensor-parallel size (attention heads and FFN width split Megatron-style)."""

    expert_tp: bool = False
    """Split experts along their FFN width over tp ranks (True) or replicate them across tp (False)."""


def validate_parallel_config(cfg: ParallelConfig, world_size: int) -> None:
    """Single-process trainer: only the trivial layout. Multi-rank layouts arrive with the distributed trainer."""
    if world_size != 1:
        raise ValueError(f"WORLD_SIZE={world_size}: this version trains in one process only; "
                         f"launch without torchrun/deepspeed (multi-rank training is not available yet)")
    for name in ("ep", "tp"):
        if getattr(cfg, name) != 1:
            raise ValueError(f"parallel.{name}={getattr(cfg, name)} needs several processes; allowed: 1")
    if cfg.dp not in (-1, 1):
        raise ValueError(f"parallel.dp={cfg.dp} does not match the world size 1; allowed: -1 (inferred) or 1")
