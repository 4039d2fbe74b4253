"""The root config: one dataclass per component, as composed by Hydra from conf/config.yaml.

`validate_config` runs every component's boundary check and the cross-component ones, before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_train.config.checkpoint import CheckpointConfig, validate_checkpoint_config
from moe_train.config.data import DataConfig, validate_data_config
from moe_train.config.distill import DistillConfig, validate_distill_config
from moe_train.config.finetune import FinetuneConfig, validate_finetune_config
from moe_train.config.fsdp import FSDPConfig, validate_fsdp_config
from moe_train.config.init import InitConfig, validate_init_config
from moe_train.config.logging import LoggingConfig, validate_logging_config
from moe_train.config.model import ModelConfig, validate_model_config
from moe_train.config.moe import MoEConfig, validate_moe_config
from moe_train.config.optim import OptimConfig, validate_optim_config
from moe_train.config.parallel import ParallelConfig, ParallelDims, resolve_dims, validate_parallel_config
from moe_train.config.train import TrainConfig, validate_train_config
from moe_train.config.zero import ZeroConfig, validate_zero_config


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    init: InitConfig = field(default_factory=InitConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def validate_config(cfg: Config, world_size: int = 1) -> ParallelDims:
    """Raise ValueError naming the first offending key, its value and what is allowed; return the layout."""
    validate_model_config(cfg.model, cfg.moe)
    if cfg.model.moe_every > 0:
        validate_moe_config(cfg.moe, cfg.model.d_model)
    validate_data_config(cfg.data)
    validate_optim_config(cfg.optim)
    validate_train_config(cfg.train)
    validate_logging_config(cfg.logger)
    validate_checkpoint_config(cfg.checkpoint)
    validate_parallel_config(cfg.parallel)
    validate_zero_config(cfg.zero, cfg.parallel.ep, cfg.parallel.tp, world_size)
    validate_fsdp_config(cfg.fsdp, cfg.zero.stage, world_size)
    validate_init_config(cfg.init, cfg.model.moe_every, cfg.moe)
    validate_finetune_config(cfg.finetune, cfg.model.tie_embeddings)
    validate_distill_config(cfg.distill)
    dims = resolve_dims(cfg.parallel, world_size, cfg.model, cfg.moe)
    validate_cross(cfg, dims)
    return dims


def validate_cross(cfg: Config, dims: ParallelDims) -> None:
    per_step = cfg.train.grad_accum_steps * dims.dp
    if cfg.train.batch_size % per_step:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by train.grad_accum_steps="
                         f"{cfg.train.grad_accum_steps} x data-parallel size {dims.dp} (micro-batches per step)")
    if cfg.train.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
