"""One micro-batch of one rank's part of a layout, run on fake tensors: what its activations weigh, exactly.

The model is built as the Trainer builds it (meta device, `parallelize` cutting this rank's tp/ep shapes, the
real dispatchers and activation checkpointing installed), then allocated as fake tensors (meta storage tagged with
a device: nothing is allocated, and unlike plain meta tensors they run under torch.autocast) and run forward and
backward under torch's MemTracker, which follows every tensor's lifetime: the peak of activations and
temporaries, with the gradients alive at that moment. With more than one rank, torch's fake process group stands in
for the others (collectives return at once), so the all-to-alls, the tensor-parallel all-reduces and the mesh are
the real code. Routing is assumed balanced: fake tensors have no values to route by (experts.has_values).

This is torchtitan's estimation method (scripts/estimate: FakeTensorMode + MemTracker + a fake process group);
DeepSpeed's engine cannot run on fake tensors, so ZeRO's states are arithmetic (states.py) around these figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.testing._internal.distributed.fake_pg import FakeStore

from moe_train.config.parallel import ParallelDims
from moe_train.config.schema import Config
from moe_train.models.moe.layer import MoELayer
from moe_train.models.param_groups import param_group
from moe_train.models.transformer import Transformer, build_model
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.expert_parallel import CommCounter
from moe_train.parallel.mesh import build_mesh
from moe_train.parallel.parallelize import parallelize
from moe_train.planner.states import FP32, RankParams


@dataclass(frozen=True)
class StepProfile:
    params: RankParams
    activation_bytes: int  # activations + temporaries at the peak of one micro-batch's forward and backward
    grad_fraction: float  # of this rank's gradients, the fraction alive at that peak (backward frees as it goes)
    a2a_bytes: int  # all-to-all bytes this rank sends for one micro-batch, forward and backward


@contextlib.contextmanager
def fake_world(rank: int, world: int, dims: ParallelDims) -> Iterator[ParallelContext]:
    """This process as `rank` of `world` over torch's fake process group (collectives do nothing), with the real
    mesh; one rank: no process group at all."""
    if world == 1:
        yield ParallelContext.single()
        return
    if dist.is_initialized():
        raise RuntimeError("planning a multi-rank layout joins a fake process group: run it in a process without "
                           "one (moe-train-plan does)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield ParallelContext(rank, dims, build_mesh(dims, "cpu"))
    finally:
        dist.destroy_process_group()


def count_rank_params(model: Transformer, frozen_groups: Sequence[str] = ()) -> RankParams:
    """Element counts of this rank's part (its shard specs: the shapes parallelize cut), and of the part that
    finetune.freeze's `frozen_groups` freeze."""
    specs = model.shard_specs
    size = {name: math.prod(spec.shape) for name, spec in specs.items()}
    expert = sum(n for name, n in size.items() if specs[name].expert)
    frozen = {name for name in specs if param_group(name) in frozen_groups}
    frozen_expert = sum(size[name] for name in frozen if specs[name].expert)
    frozen_dense = sum(size[name] for name in frozen) - frozen_expert

    def under(prefix: str) -> int:
        return sum(n for name, n in size.items() if name.startswith(prefix + "."))

    blocks = [under(f"layers.{i}") for i in range(len(model.layers))]
    moe = [under(f"layers.{i}.moe") for i, layer in enumerate(model.layers) if isinstance(layer.moe, MoELayer)]
    root = sum(size.values()) - sum(blocks)
    return RankParams(sum(size.values()) - expert, expert, max(blocks), max(moe or blocks), root, frozen_dense,
                      frozen_expert)


def profile_step(cfg: Config, ctx: ParallelContext, micro_batch: int, weights_bf16: bool = False) -> StepProfile:
    """Forward and backward of one micro-batch [micro_batch, train.seq_len] of this rank's part on fake tensors.
    weights_bf16: the matmul weights are bf16 already (FSDP2's gathered parameters under mixed precision), so
    autocast keeps no bf16 copies of them."""
    counter = CommCounter()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False),
                              fsdp=dataclasses.replace(cfg.fsdp, enabled=False))
    # The Trainer's construction, kept on the meta device (bf16 cast there: under FakeTensorMode .to() would swap
    # tensors and fail; build_model keeps the router float32, as FSDP2 gathers it).
    model = build_model(cfg.model, cfg.moe, "meta", dtype=torch.bfloat16 if weights_bf16 else None,
                        shard=lambda m: parallelize(m, ctx, cfg, counter))
    # Not frozen here: MemTracker hooks every parameter's gradient. The frozen part is counted by name; the state
    # arithmetic leaves its gradients and optimizer state out, the measured gradient fraction covers all.
    params = count_rank_params(model, cfg.finetune.freeze)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        peak = tracked_peak(model, cfg, micro_batch)
    grads = FP32 * params.total
    return StepProfile(params, peak["Activation"] + peak["Temp"], min(1.0, peak["Gradient"] / max(1, grads)),
                       counter.bytes_sent)


def tracked_peak(model: Transformer, cfg: Config, micro_batch: int) -> dict[str, int]:
    """MemTracker's per-category bytes at the peak of one forward + backward (called under FakeTensorMode)."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        forward = lambda inputs, tasks: model(inputs, return_aux=True, task_ids_BS=tasks)  # noqa: E731
        micro_batch_loss(forward, cfg, micro_batch).backward()
    (peak,) = tracker.get_tracker_snapshot("peak").values()
    return peak


def micro_batch_loss(forward, cfg: Config, micro_batch: int) -> torch.Tensor:
    """The Trainer's loss (LM cross-entropy in float32 + the MoE aux loss, autocast as configured) of a random
    micro-batch [micro_batch, train.seq_len]; called under FakeTensorMode. forward(inputs, task_ids or None) ->
    (logits, aux)."""
    from moe_train.training.trainer import lm_loss

    inputs_BS = torch.randint(0, cfg.model.vocab_size, (micro_batch, cfg.train.seq_len))
    task_ids_BS = None  # task-routed layers (moe.router_input) need a task per token
    if cfg.moe.router_input != "token":
        task_ids_BS = torch.randint(0, cfg.moe.num_tasks, inputs_BS.shape)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16"):
        logits, aux_loss = forward(inputs_BS, task_ids_BS)
    return lm_loss(logits, inputs_BS) + aux_loss
