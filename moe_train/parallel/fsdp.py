"""FSDP2 with expert parallelism (`fsdp.enabled=true`): torch's `fully_shard` over this rank's part of the model,
applied last in `parallelize` (after tp, ep, activation checkpointing and compile), on the meta device: each rank
then allocates and initialises only its FSDP rows (sharded construction, models/init.py).

Units, innermost first (torchtitan's `apply_fsdp` with its "efsdp" mesh for experts):
  * each MoE layer's routed experts, over the expert-data-parallel mesh (the dp / ep replicas of this ep rank's
    experts): an expert stack [E/ep, F, D] is cut along its expert dim into edp pieces, or along dim 1 when there
    are fewer local experts than edp ranks;
  * each MoE layer's router, over dp, gathered in float32 even under bf16 (routing decisions are sensitive to
    rounding; the router weight stays float32 as without FSDP);
  * each transformer block (the rest of it), over dp;
  * the root (embeddings, final norm, LM head), over dp.
Parameters are DTensors cut with torch.chunk's rows on dim 0 (dim 1 for such expert stacks; trailing ranks may hold
fewer rows or none); each cut is recorded in model.shard_specs ("dp" or "edp"), so checkpoints, the grad norm and
initialisation read one description.

Gradients: dense ones are averaged over dp (FSDP's default). An expert's gradient on its owner already sums every
ep rank's tokens, so it must be summed over edp and divided by dp (as parallel/data_parallel.py does), not averaged
over edp: the experts' units get gradient_divide_factor = dp (torchtitan does the same). gloo has no PREMUL_SUM, so
on CPU that reduction is a SUM followed by the division (`set_force_sum_reduction_for_comms`).

Collectives (per block, forward): an all-gather of its parameters; backward: the all-gather again when
reshard_after_forward, then a reduce-scatter of its gradients. The MoE all-to-alls are unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_train.checkpoint.holders import TorchState
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.data_parallel import clip_grad_norm
from moe_train.parallel.mesh import ParallelGroups
from moe_train.training.engine import LocalEngine


def mixed_precision(bf16: bool, param_dtype: Optional[torch.dtype] = None) -> MixedPrecisionPolicy:
    """bf16: parameters gathered in bf16 (param_dtype overrides), gradients reduced in float32."""
    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype or torch.bfloat16, reduce_dtype=torch.float32)


def record_rows(model: nn.Module, unit: nn.Module, prefix: str, mesh_dim: str, rank: int, size: int,
                dim: int) -> None:
    """Narrow the specs of the parameters `fully_shard(unit)` just cut (those not already in an inner unit)."""
    for name, _ in unit.named_parameters():
        full = f"{prefix}.{name}" if prefix else name
        if not any(d in ("dp", "edp") for d in model.shard_specs[full].over):
            model.shard_specs[full] = model.shard_specs[full].chunk(rank, size, mesh_dim, dim)


def shard_unit(model: nn.Module, prefix: str, mesh_dim: str, groups: ParallelGroups, dim: int = 0,
               **kwargs) -> nn.Module:
    """fully_shard the submodule at `prefix` ("" = the root) over the dp or edp mesh, cutting `dim`; record it."""
    mesh = groups.dp_mesh if mesh_dim == "dp" else groups.edp_mesh
    unit = model.get_submodule(prefix) if prefix else model
    fully_shard(unit, mesh=mesh, shard_placement_fn=(lambda p: Shard(dim)) if dim else None, **kwargs)
    record_rows(model, unit, prefix, mesh_dim, mesh.get_local_rank(), mesh.size(), dim)
    return unit


def expert_shard_dim(local_experts: int, edp: int) -> int:
    """Cut expert stacks along the expert dim (0), unless there are fewer local experts than edp ranks: then most
    ranks would hold none (1 expert over 8 ranks: one rank holds it whole), so along dim 1 (F of w1/w3, D of w2),
    as torchtitan does."""
    return 0 if local_experts >= edp else 1


def apply_fsdp(model: nn.Module, ctx: ParallelContext, bf16: bool, reshard_after_forward: bool,
               sum_only: bool) -> None:
    """Wrap the units listed in the module docstring; sum_only: the backend has no PREMUL_SUM (gloo), so the
    experts' custom division follows a SUM."""
    groups = ctx.groups
    common = {"reshard_after_forward": reshard_after_forward}
    for i, block in enumerate(model.layers):
        if block.moe is not None:
            dim = expert_shard_dim(block.moe.experts.num_experts, ctx.dims.edp)
            experts = shard_unit(model, f"layers.{i}.moe.experts", "edp", groups, dim,
                                 mp_policy=mixed_precision(bf16), **common)
            experts.set_gradient_divide_factor(float(ctx.dims.dp))
            # One edp rank: FSDP copies the gradient divided by the factor, and with force-sum would divide by it
            # again (torch 2.13); with no reduce-scatter there is no reduce op to choose either.
            experts.set_force_sum_reduction_for_comms(sum_only and ctx.dims.edp > 1)
            shard_unit(model, f"layers.{i}.moe.router", "dp", groups,
                       mp_policy=mixed_precision(bf16, torch.float32), **common)
        shard_unit(model, f"layers.{i}", "dp", groups, mp_policy=mixed_precision(bf16), **common)
    shard_unit(model, "", "dp", groups, mp_policy=mixed_precision(bf16), reshard_after_forward=False)


class FSDPState(TorchState):
    """Weights and AdamW state as FSDP2's DTensors: this rank stores and loads its rows (the local tensors);
    the placement's region (shard_specs) is exactly those rows."""

    def weights(self, p, writer):
        if writer:
            yield 0, p.detach().to_local().reshape(-1)

    def load_weights(self, p, whole):
        p.detach().to_local().copy_(whole)

    def fragments(self, p, writer):
        state = {k: v.to_local().reshape(-1) for k, v in self.optimizer.state.get(p, {}).items()
                 if hasattr(v, "to_local") and v.shape == p.shape}
        if writer and state:
            yield 0, state

    def load(self, p, tensors, scalars):
        """tensors: this rank's rows; AdamW keeps its state as DTensors shaped like p."""
        state = {k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride()) for k, v in tensors.items()}
        super().load(p, state, scalars)


class FSDPEngine(LocalEngine):
    """The Engine (training/engine.py) over FSDP2: FSDP reduces the gradients in backward (reduce-scatter at the
    last micro-batch; earlier ones accumulate unsharded gradients locally), we clip with the global norm, torch
    AdamW steps the sharded (DTensor) parameters."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.model.set_requires_gradient_sync(last)  # reduce-scatter once per optimizer step
        (loss / self.cfg.train.grad_accum_steps).backward()  # collectives at the last micro-batch

    def clip(self) -> torch.Tensor:
        """Already reduced by FSDP: only the global norm over the shards (collectives) and the clipping."""
        return clip_grad_norm(self.model, self.cfg.optim.grad_clip, self.ctx.groups)  # collectives

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        """Units that keep their gathered parameters after forward (the root; every block under
        fsdp.reshard_after_forward=false) would keep them after a no-grad forward, with no backward to free them:
        the checkpoint that follows an evaluation would then see whole tensors. Reshard them (torchtitan's validator
        does the same)."""
        with super().evaluation():
            yield
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def state_holder(self) -> TorchState:
        return FSDPState(self.optimizer)
