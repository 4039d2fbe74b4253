"""FSDP2 (config key `fsdp`): parameters, gradients and optimizer state fully sharded over the data-parallel ranks
with torch's `fully_shard`, experts over their expert-data-parallel group (moe_train/parallel/fsdp.py).

    fsdp.enabled=true parallel.ep=2     # dense state split over dp ranks, each expert shard's over dp / ep ranks
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FSDPConfig:
    enabled: bool = False
    """Shard with FSDP2: each rank keeps 1/dp of the dense parameters, gradients and AdamW state, and 1/edp of its
    experts' (edp = dp / ep), gathering a block's parameters for its forward and backward. Excludes DeepSpeed
    (zero.stage must stay -1). Under train.mixed_precision=bf16 the gathered parameters are bf16 (the router's stay
    float32), gradients are reduced in float32 and the sharded masters and optimizer state are float32."""

    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward and gather them again for backward (ZeRO-3-like
    memory; one more all-gather per block). false keeps them until backward (ZeRO-2-like: less communication, the
    full parameters of every block held between forward and backward)."""


def validate_fsdp_config(cfg: FSDPConfig, zero_stage: int, world_size: int) -> None:
    if not cfg.enabled:
        return
    if zero_stage >= 0:
        raise ValueError(f"fsdp.enabled=true with zero.stage={zero_stage}: FSDP2 and DeepSpeed ZeRO both shard the "
                         f"model, choose one; allowed: zero.stage=-1 with fsdp.enabled=true, or fsdp.enabled=false")
    if world_size < 2:
        raise ValueError(f"fsdp.enabled=true needs a distributed launch (world size {world_size}): on one process "
                         f"there is nothing to shard; allowed: fsdp.enabled=false, or launch >= 2 ranks")
