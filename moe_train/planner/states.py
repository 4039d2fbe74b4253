"""Bytes of the training state one rank holds (parameters, gradients, optimizer state) under each engine.

Pure arithmetic on parameter counts: no model, no torch. The counts are this rank's tensor/expert-parallel part
(`RankParams`, counted from the real model's shard specs); each engine then keeps a fraction of it. Everything is
float32 in moe_train (bf16 is torch.autocast: weights, gradients and AdamW state stay float32), so:

  engine              parameters                 gradients                       optimizer (AdamW)
  local (zero=-1), 0  4 P                        4 P                             8 P
  ZeRO 1              4 P                        4 P + 4 P/d + bucket            (4 + 8) P/d  (fp32 partition + m, v)
  ZeRO 2              4 P                        4 P/d + bucket                  (4 + 8) P/d
  ZeRO 3              4 P/d + gathered           4 P/d + bucket                  (4 + 8) P/d
  FSDP2               4 P/d + gathered units     4 P/d + one unit's unsharded    8 P/d

P/d: dense parameters over dp, experts over edp = dp / ep (their replicas). DeepSpeed's ZeRO 1-3 optimizer keeps a
float32 copy of its partition even when the model is float32 (stage_1_and_2.py `single_partition_of_fp32_groups`,
stage3.py `fp32_partitioned_groups_flat`), and gives it a float32 gradient partition at the step. `bucket`: the
contiguous gradient bucket of zero.reduce_bucket_size elements (float32), at most the gradients' own size.
"Gathered": the parameters a rank holds whole while it computes: FSDP2 a unit and the next one it prefetches (in
the gather dtype: bf16 under mixed precision), or every block's when fsdp.reshard_after_forward=false; ZeRO 3 the
largest leaf module (a whole MoE layer: DeepSpeed's advice for MoE) and the prefetch bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

FP32 = 4
ADAM_BYTES = 2 * FP32  # exp_avg and exp_avg_sq
ZERO3_PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's stage3_prefetch_bucket_size default (moe_train does not set it)


@dataclass(frozen=True)
class RankParams:
    """Parameters of this rank's tensor/expert-parallel part, in elements."""

    dense: int  # everything but the routed experts (attention, norms, router, embeddings, LM head, dense FFNs)
    expert: int  # this rank's routed-expert stacks
    largest_block: int  # one transformer block (its experts included): the largest FSDP2 unit
    largest_leaf: int  # ZeRO 3's largest gathered module: a block's dense part plus its whole MoE layer
    root: int  # embeddings, final norm, LM head: FSDP2's root unit, kept gathered through the step
    frozen_dense: int = 0  # of `dense`, frozen by finetune.freeze: no gradient, no optimizer state
    frozen_expert: int = 0  # of `expert`, frozen

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def trainable(self) -> "RankParams":
        """The parameters that get gradients and optimizer state."""
        return replace(self, dense=self.dense - self.frozen_dense, expert=self.expert - self.frozen_expert,
                       frozen_dense=0, frozen_expert=0)


@dataclass(frozen=True)
class StateLayout:
    """How the chosen engine (training/engine.py) holds the state: zero_stage -1 = moe_train's own reduction (or
    FSDP2 when fsdp), and the settings that change its bytes."""

    zero_stage: int = -1
    fsdp: bool = False
    reshard_after_forward: bool = True
    bf16: bool = False
    reduce_bucket_size: int = 500_000_000  # elements
    fused_optimizer: bool = True  # CUDA: fused AdamW needs no temporaries; CPU's foreach AdamW one float32 copy

    @property
    def name(self) -> str:
        if self.fsdp:
            return "FSDP2"
        return f"ZeRO {self.zero_stage}" if self.zero_stage >= 0 else "local"


@dataclass(frozen=True)
class StateBytes:
    params: int  # elements this rank stores (its shard)
    param_bytes: int  # stored shard plus whole parameters held while computing
    grad_bytes: int
    optimizer_bytes: int
    step_temp_bytes: int  # temporaries of the optimizer step


def sharded(p: RankParams, dp: int, edp: int) -> int:
    """Elements of this rank's partition: dense over dp, experts over edp (ceil: the largest rank's)."""
    return -(-p.dense // dp) + -(-p.expert // edp)


def state_bytes(p: RankParams, engine: StateLayout, dp: int, edp: int) -> StateBytes:
    """Parameters as stored; gradients and optimizer state of the trainable ones only (finetune.freeze)."""
    part, trained = sharded(p, dp, edp), p.trainable()
    trained_part = sharded(trained, dp, edp)
    if engine.fsdp:
        return fsdp_states(p, engine, part, trained_part)
    if engine.zero_stage >= 1:
        return zero_states(p, engine, part, trained.total, trained_part)
    temp = 0 if engine.fused_optimizer else FP32 * trained.total
    return StateBytes(p.total, FP32 * p.total, FP32 * trained.total, ADAM_BYTES * trained.total, temp)


def zero_states(p: RankParams, engine: StateLayout, part: int, trained: int, trained_part: int) -> StateBytes:
    stage = engine.zero_stage
    bucket = FP32 * min(engine.reduce_bucket_size, trained)
    if stage == 3:
        gathered = FP32 * (p.largest_leaf + ZERO3_PREFETCH_ELEMENTS)
        params, param_bytes = part, FP32 * part + gathered
    else:
        params, param_bytes = p.total, FP32 * p.total
    grads = FP32 * (trained if stage == 1 else 0) + FP32 * trained_part + (bucket if stage >= 2 else 0)
    return StateBytes(params, param_bytes, grads, (FP32 + ADAM_BYTES) * trained_part, 0)


def fsdp_states(p: RankParams, engine: StateLayout, part: int, trained_part: int) -> StateBytes:
    gather_bytes = 2 if engine.bf16 else FP32
    units = p.total - p.root if not engine.reshard_after_forward else 2 * p.largest_block
    gathered = gather_bytes * (units + p.root)
    unsharded_grads = FP32 * p.largest_block  # a unit's gradients before its reduce-scatter (frozen or not)
    temp = 0 if engine.fused_optimizer else FP32 * trained_part
    return StateBytes(part, FP32 * part + gathered, FP32 * trained_part + unsharded_grads,
                      ADAM_BYTES * trained_part, temp)
