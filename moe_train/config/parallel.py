"""Parallel layout (config key `parallel`): world = dp x tp, experts sharded over ep ranks (ep divides dp).

`resolve_dims` checks the layout against the world size and the model's shapes and returns `ParallelDims`."""

from __future__ import annotations

from dataclasses import dataclass

from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig

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


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    ep: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.tp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert shard."""
        return self.dp // self.ep


def _infer_dp(cfg: ParallelConfig, world_size: int) -> int:
    if cfg.tp < 1 or world_size % cfg.tp:
        raise ValueError(f"parallel.tp={cfg.tp} must be >= 1 and divide the world size {world_size}")
    dp = world_size // cfg.tp if cfg.dp == -1 else cfg.dp
    if dp < 1 or dp * cfg.tp != world_size:
        raise ValueError(f"parallel.dp={cfg.dp} x parallel.tp={cfg.tp} must equal the world size {world_size} "
                         f"(set parallel.dp=-1 to infer it)")
    return dp


def resolve_dims(cfg: ParallelConfig, world_size: int, model: ModelConfig, moe: MoEConfig) -> ParallelDims:
    """Validate the layout against the world size and the model's shapes; raise ValueError naming the values."""
    dp = _infer_dp(cfg, world_size)
    if cfg.ep < 1 or dp % cfg.ep:
        raise ValueError(f"parallel.ep={cfg.ep} must be >= 1 and divide the data-parallel size {dp}")
    if model.moe_every > 0 and moe.num_experts % cfg.ep:
        raise ValueError(f"moe.num_experts={moe.num_experts} is not divisible by parallel.ep={cfg.ep}")
    for name, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", model.n_kv_heads),
                        ("model.d_ff", model.d_ff)):
        if value % cfg.tp:
            raise ValueError(f"{name}={value} is not divisible by parallel.tp={cfg.tp}")
    if cfg.expert_tp and moe.d_ff % cfg.tp:
        raise ValueError(f"moe.d_ff={moe.d_ff} is not divisible by parallel.tp={cfg.tp} (parallel.expert_tp=true)")
    return ParallelDims(dp, cfg.ep, cfg.tp)
