"""Parallel layout (config key `parallel`): world = dp x tp, experts sharded over ep ranks (ep divides dp).

The layout is checked against the world size and the model's shapes by moe_train.parallel.dims.resolve_dims."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "nccl", "gloo")


@dataclass
class ParallelConfig:
    dp: int = -1
    """Data-parallel size; -1 = inferred as world_size / tp."""

    ep: int = 1
    """Expert-parallel size: experts are split over ep ranks of the data-parallel group; must divide dp and
    moe.num_experts. Each expert shard is replicated over dp / ep ranks (the expert-data-parallel group)."""

    tp: int = 1
    """Tensor-parallel size (attention heads and FFN width split Megatron-style)."""

    expert_tp: bool = False
    """Split experts along their FFN width over tp ranks (True) or replicate them across tp (False)."""

    backend: str = "auto"
    """Collective backend: `auto` (NCCL on CUDA, gloo on CPU), `nccl` or `gloo`."""

    timeout_s: float = 600.0
    """Collective timeout in seconds: a rank that dies makes the others fail after this long instead of hanging."""


def validate_parallel_config(cfg: ParallelConfig) -> None:
    if cfg.backend not in BACKENDS:
        raise ValueError(f"parallel.backend={cfg.backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    if not cfg.timeout_s > 0:
        raise ValueError(f"parallel.timeout_s={cfg.timeout_s} must be > 0 seconds")
