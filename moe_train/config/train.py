"""Training loop settings (config key `train`)."""

from __future__ import annotations

from dataclasses import dataclass

MIXED_PRECISION = ("none", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


@dataclass
class TrainConfig:
    """Steps, batch geometry, precision, evaluation and logging cadence."""

    max_steps: int = 300
    """Optimizer steps to train for."""

    batch_size: int = 16
    """Global batch, in sequences per optimizer step (over all data-parallel ranks and accumulation steps)."""

    grad_accum_steps: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (as DeepSpeed's gradient_accumulation_steps):
    micro-batch size = batch_size / (grad_accum_steps x dp). Keep the micro-batch size when changing dp (e.g. dp 2
    with half the accumulation steps) and every layout computes the same micro-batches."""

    seq_len: int = 128
    """Tokens per training sequence; at most model.max_seq_len."""

    seed: int = 0
    """Seed of parameter init and of every random choice in training (router noise, sampling). Same seed, same run."""

    mixed_precision: str = "none"
    """`none` = float32 everywhere; `bf16` = torch.autocast to bfloat16 (weights, optimizer and router stay float32)."""

    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu` or `cuda`."""

    log_every: int = 10
    """Write a metrics line (and update the progress bar's numbers) every this many steps (a host sync each time)."""

    eval_every: int = 100
    """Evaluate on the held-out split every this many steps and at the last step; 0 = never."""

    eval_batches: int = 8
    """Validation micro-batches per evaluation (fixed, the same every time), over all data-parallel ranks; rounded
    down to a multiple of the dp size (at least one per rank) so that every rank runs the same number."""

    progress: bool = True
    """Show the rank-0 progress bar (loss and tokens/s)."""

    compile: bool = False
    """torch.compile each transformer block (as torchtitan does): the first steps pay the compile time (tens of
    seconds per distinct block), later ones run fused kernels. Under expert parallelism the all-to-all runs eagerly
    between the compiled regions (see moe_train/parallel/compile.py)."""

    activation_checkpointing: str = "none"
    """Recompute activations in backward instead of keeping them: `none`; `full` (each transformer block keeps
    only its input: the least memory, about +33% compute); `selective` (the feed-forward networks, routed experts
    included, recompute their hidden activations, the largest part of an MoE block's; no communication is
    repeated). See moe_train/parallel/activation_checkpoint.py."""

    tf32: bool = True
    """Let float32 matmuls and convolutions use TF32 tensor cores on Ampere and later GPUs (10-bit mantissa inputs,
    float32 accumulation; what torch calls float32 matmul precision `high`). No effect on CPU."""


def validate_train_config(cfg: TrainConfig) -> None:
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"train.mixed_precision={cfg.mixed_precision!r} is not supported; "
                         f"allowed: {', '.join(MIXED_PRECISION)}")
    if cfg.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={cfg.activation_checkpointing!r} is not supported; "
                         f"allowed: {', '.join(ACTIVATION_CHECKPOINTING)}")
    if cfg.device not in DEVICES:
        raise ValueError(f"train.device={cfg.device!r} is not supported; allowed: {', '.join(DEVICES)}")
    for name in ("max_steps", "batch_size", "grad_accum_steps", "seq_len", "log_every", "eval_batches"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"train.{name}={getattr(cfg, name)} must be >= 1")
    if cfg.eval_every < 0:
        raise ValueError(f"train.eval_every={cfg.eval_every} must be >= 0 (0 = no evaluation)")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by "
                         f"train.grad_accum_steps={cfg.grad_accum_steps}")
