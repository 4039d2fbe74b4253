"""DeepSpeed ZeRO stages 0-3 around a model that `parallelize` already sharded (`zero.stage`).

Integration choice: an adapter DeepSpeed recognises. DeepSpeed's engine treats parameters as expert parameters
(reduced and partitioned over the expert-data-parallel group, kept out of the dense groups) only when the model
contains an instance of `deepspeed.moe.layer.MoE`; tagging parameters of a plain module with `allreduce=False` fails
at initialize or at backward. So each of our MoE layers gets a child `ExpertParallelMarker`, a subclass of
`MoE` that skips `MoE.__init__` (no gate, no experts, no parameters), is never called, and only carries what the
engine reads (num_experts, ep_size, expert_group_name); our expert stacks are tagged `allreduce=False` and
`group_name`. Tokens still travel through our own all-to-all dispatcher (moe_train/parallel/expert_parallel.py);
DeepSpeed only reduces, partitions and steps. Why not the alternative (experts kept out of DeepSpeed with their own
sharded optimizer): two optimizers, two clipping passes that must agree on one global norm, two LR schedules and two
checkpoint formats, and ZeRO's dense partitioning would not know the experts exist; the adapter keeps one engine,
one optimizer step and DeepSpeed's own MoE code paths (the ones its MoE users run), at the cost of depending on
`MoE` attributes and private `deepspeed.utils.groups` functions (pinned by tests/test_zero.py).

What DeepSpeed then does (0.19.8, read in engine.py and runtime/zero/stage_1_and_2.py):
  * dense gradients: averaged over the data-parallel group (the world, as tp = 1);
  * expert gradients: summed over the expert-data-parallel group and divided by the dp size, as our own
    `reduce_gradients` does (each expert shard already summed every ep rank's tokens through the all-to-all);
  * ZeRO 1/2: optimizer groups marked `'moe': True` are partitioned over the expert-data-parallel group (dp / ep
    ranks), the others over dp. The global grad norm sums the partitions' squares over dp: the true global norm.
  * ZeRO 3 partitions parameters too, and refuses a native `MoE` ("Native DeepSpeed MoE is not supported with
    ZeRO Stage 3"), but since 0.19.3 accepts its AutoEP layer: under stage 3 with parallel.ep > 1 the marker is an
    `AutoEPMarker` (a parameter-free AutoEPMoELayer) and the expert stacks also carry the AutoEP placement tags
    (`ds_zero_placement_family="autoep_expert"`, `ds_zero_partition_group_name`), so the engine partitions them over
    the expert-data-parallel group, sums their gradients over it divided by dp, and sums the global norm's expert
    squares over ep (read in engine.py `_resolve_zero3_param_placement`, stage3.py `_gradient_averaging_world_size`,
    `get_grad_norm_direct`). Untagged experts would be partitioned over dp and train wrong without an error, so
    after initialize every expert's partition group is checked against the mesh's edp group. At ep = 1 the experts
    are ordinary dense parameters (edp = dp) and no marker is installed. Each MoE layer is made a ZeRO-3 leaf module
    (`set_z3_leaf_modules`): all its parameters are gathered when it is entered. Needed because ZeRO-3 re-gathers a
    module's parameters for backward through hooks on the tensors the module returns, and the router returns a
    dataclass whose tensors those hooks do not see (its weight would be a 0-element partition when its gradient
    arrives); it is also DeepSpeed's advice for MoE, whose order of module calls varies from batch to batch.
  * Stage 0 clips with a norm averaged over ranks, which is not the global norm once experts are sharded (each rank
    sees other experts): there we clip ourselves (`clip_grad_norm`) after DeepSpeed's reduction and give DeepSpeed
    gradient_clipping=0. Stages 1-3 clip in the ZeRO optimizer with the true norm.

Also: the optimizer is a torch AdamW client optimizer (`zero_allow_untested_optimizer`): DeepSpeed's own Adam ops
JIT-compile for ~45 s on CPU. The LR schedule is our LambdaLR, handed to the engine, which steps it at each
accumulation boundary, so the LR sequence equals the single-process run's. bf16 stays torch.autocast with float32
weights, gradients and optimizer state (as without DeepSpeed); DeepSpeed's bf16 section (bf16 weights + fp32 master)
is not used. DeepSpeed's comm layer wraps the process group init_parallel created; its shared-memory CPU allreduce
op is not built (`__compatible_ops__["deepspeed_shm_comm"] = False`: its JIT build costs ~26 s cold, and gloo
carries the CPU collectives here). DeepSpeed creates its expert groups itself; on every rank they are checked to
hold the same ranks as our mesh's ep and edp groups (mesh.py: rank = (edp_index * ep + ep_index) * tp + tp_index;
with tp = 1 both put an ep group on consecutive ranks and an edp group on ranks ep apart).

Not supported yet: zero.stage >= 0 with parallel.tp > 1 (no DeepSpeed mpu) or on one process. Checkpoints are
moe_train's own (each rank writes the ZeRO partitions it holds: moe_train/checkpoint/holders.py), not
engine.save_checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups as ds_groups
from deepspeed.utils import set_z3_leaf_modules
from torch import nn

from moe_train.checkpoint.holders import TorchState, Zero3State, Zero12State
from moe_train.config.schema import Config
from moe_train.models.moe.layer import MoELayer
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.data_parallel import clip_grad_norm
from moe_train.training.engine import eval_mode, task_kwargs
from moe_train.training.optim import build_scheduler, param_groups

MARKER_NAME = "deepspeed_moe_marker"


class ExpertParallelMarker(MoE):
    """Makes the DeepSpeed engine see a MoE layer with `num_experts` experts sharded over `ep_size` ranks. Holds no
    parameters and is never called: the MoE layer it hangs under does the work."""

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)  # not MoE.__init__: it would build DeepSpeed's own gate and experts
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.use_residual, self.enable_expert_tensor_parallelism = False, False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this on every module that has it; the groups were created (and checked against the
        mesh) before deepspeed.initialize, and there is no DeepSpeed MOELayer to hand them to."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("ExpertParallelMarker only marks a MoE layer for DeepSpeed; it is never called")


class AutoEPMarker(AutoEPMoELayer):
    """ZeRO 3's marker: the engine refuses a native `MoE` under stage 3 but accepts its AutoEP layer (DeepSpeed
    >= 0.19.3), whose expert parameters it partitions over the expert-data-parallel group. Skips
    AutoEPMoELayer.__init__ (it would build a router and experts from a Hugging Face block); no parameters, never
    called."""

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.ep_group_name = expert_group_name(ep_size)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                  folding_group_handles=None) -> None:
        """As ExpertParallelMarker's: the groups exist and were checked before deepspeed.initialize."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("AutoEPMarker only marks a MoE layer for DeepSpeed; it is never called")


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"  # the name DeepSpeed's MoE layer gives its expert groups


def init_deepspeed_comm(backend: str) -> None:
    """DeepSpeed's comm layer over the process group init_parallel already created (nothing new is joined).
    Skips building the shared-memory CPU allreduce op (a ~26 s JIT compile on first use)."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)


def group_ranks(group: Optional[dist.ProcessGroup], rank: int) -> list[int]:
    return dist.get_process_group_ranks(group) if group is not None else [rank]


def create_expert_groups(ctx: ParallelContext) -> str:
    """Collective (every rank, same order): DeepSpeed's expert-parallel and expert-data-parallel groups for
    parallel.ep, checked to hold the same ranks as our mesh's ep and edp groups."""
    name = expert_group_name(ctx.dims.ep)
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ctx.dims.ep)  # collective: new_group per group
    theirs = {"ep": sorted(dist.get_process_group_ranks(ds_groups._get_expert_parallel_group(name))),
              "edp": sorted(dist.get_process_group_ranks(ds_groups._get_expert_data_parallel_group(name)))}
    ours = {dim: sorted(group_ranks(getattr(ctx.groups, dim), ctx.rank)) for dim in ("ep", "edp")}
    if theirs != ours:
        raise RuntimeError(f"rank {ctx.rank}: DeepSpeed's expert groups {theirs} differ from the mesh's {ours} "
                           f"(parallel.ep={ctx.dims.ep}); expert gradients would be reduced over the wrong ranks")
    return name


def mark_experts(model: nn.Module, num_experts: int, ep: int, group_name: str, stage: int) -> None:
    """Hang a marker under every MoE layer and tag its expert stacks as DeepSpeed expert parameters; under ZeRO 3
    as AutoEP experts (the tags the engine's ZeRO-3 placement reads: without them it partitions the experts over
    dp, mixing different ranks' experts, silently)."""
    marker = AutoEPMarker if stage == 3 else ExpertParallelMarker
    for moe in model.moe_layers():
        moe.add_module(MARKER_NAME, marker(num_experts, ep))
        for p in moe.experts.parameters():
            p.allreduce, p.group_name = False, group_name  # broadcast and reduced over edp, not dp
            if stage == 3:
                p.ds_zero_placement_family, p.ds_zero_partition_group_name = "autoep_expert", group_name


def optimizer_groups(model: nn.Module, weight_decay: float, has_experts: bool) -> list[dict]:
    """Our decay / no-decay policy (training/optim.py), each split further into dense and expert groups; expert
    groups are marked `'moe': True` and named after their DeepSpeed group, as ZeRO 1/2 require."""
    named = [{**g, "name": name} for g, name in zip(param_groups(model, weight_decay), ("decay", "no_decay"))
             if g["params"]]  # finetune.freeze may empty one; DeepSpeed's flat buffers need parameters
    groups = split_params_into_different_moe_groups_for_optimizer(named) if has_experts else named
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: Config, micro_batch_size: int, dp: int) -> dict:
    """DeepSpeed's JSON config from ours: the same batch geometry (train_batch_size = micro x accumulation x dp),
    float32 (no fp16/bf16 section: bf16 is our autocast), no DeepSpeed optimizer or scheduler (ours are passed)."""
    t, zero = cfg.train, cfg.zero
    clip = cfg.optim.grad_clip if zero.stage > 0 else 0.0  # stage 0: we clip (see module docstring)
    return {"train_batch_size": micro_batch_size * t.grad_accum_steps * dp,
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": t.grad_accum_steps,
            "gradient_clipping": clip,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": zero.stage, "reduce_bucket_size": zero.reduce_bucket_size,
                                  "allgather_bucket_size": zero.allgather_bucket_size,
                                  "stage3_param_persistence_threshold": zero.param_persistence_threshold},
            "steps_per_print": 2 ** 62,  # we log; DeepSpeed's own progress lines would repeat it
            "wall_clock_breakdown": False}


def prepare_model(model: nn.Module, cfg: Config, ctx: ParallelContext) -> bool:
    """Collective: mark the experts for DeepSpeed (and make MoE layers ZeRO-3 leaf modules); True if the model has
    expert parameters DeepSpeed must treat apart (not at ZeRO 3 with ep 1: there edp = dp, experts are dense)."""
    has_moe = any(True for _ in model.moe_layers())
    has_experts = has_moe and (cfg.zero.stage < 3 or ctx.dims.ep > 1)
    if has_experts:
        mark_experts(model, cfg.moe.num_experts, ctx.dims.ep, create_expert_groups(ctx), cfg.zero.stage)
    if cfg.zero.stage == 3 and has_moe:
        set_z3_leaf_modules(model, [MoELayer])
    return has_experts


def check_zero3_expert_partitions(model: nn.Module, ctx: ParallelContext) -> None:
    """After initialize under ZeRO 3 with ep > 1: every expert stack is partitioned over the mesh's edp group (a
    DeepSpeed that ignored the tags would partition it over dp and train wrong, silently)."""
    edp = sorted(group_ranks(ctx.groups.edp, ctx.rank))
    for moe in model.moe_layers():
        for p in moe.experts.parameters():
            ranks = sorted(dist.get_process_group_ranks(p.ds_process_group))
            if ranks != edp:
                raise RuntimeError(f"rank {ctx.rank}: DeepSpeed partitioned an expert parameter over ranks {ranks}, "
                                   f"not the expert-data-parallel group {edp} (parallel.ep={ctx.dims.ep})")


def build_deepspeed_engine(model: nn.Module, cfg: Config, ctx: ParallelContext, micro_batch_size: int):
    """Collective: DeepSpeed's groups and engine for this rank's (already parallelized) model, with a torch AdamW
    client optimizer over the dense/expert groups and our LR schedule (both then owned by the engine)."""
    init_deepspeed_comm(cfg.parallel.backend if cfg.parallel.backend != "auto" else None)
    has_experts = prepare_model(model, cfg, ctx)  # collective
    o = cfg.optim
    # ZeRO 3 splits each group by its parameters' partition groups itself: no 'moe' groups there.
    groups = optimizer_groups(model, o.weight_decay, has_experts and cfg.zero.stage < 3)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    scheduler = build_scheduler(optimizer, o, cfg.train.max_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=deepspeed_config(cfg, micro_batch_size, ctx.dims.dp))  # collective
    if cfg.zero.stage == 3 and has_experts:
        check_zero3_expert_partitions(model, ctx)
    return engine


class ZeroEngine:
    """The Engine (training/engine.py) over a DeepSpeed engine: forward, backward per micro-batch, clipping and the
    step at the accumulation boundary, with DeepSpeed's optimizer (wrapping our AdamW) and our schedule."""

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext, micro_batch_size: int):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.engine = build_deepspeed_engine(model, cfg, ctx, micro_batch_size)  # collective

    @property
    def optimizer(self):
        """Stage 0: the torch AdamW; stages 1-3: ZeRO's wrapper of it (`.optimizer` holds the partitioned state)."""
        return self.engine.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.engine.lr_scheduler

    def forward(self, inputs: torch.Tensor,
                task_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Through the engine: it registers the hooks its backward (and ZeRO 3's gathering) need."""
        return self.engine(inputs, return_aux=True, **task_kwargs(task_ids))

    def state_holder(self) -> TorchState:
        """Stage 0: our AdamW's whole tensors; 1/2: partitioned optimizer state; 3: partitioned weights too."""
        if self.cfg.zero.stage in (1, 2):
            return Zero12State(self.optimizer)
        if self.cfg.zero.stage == 3:
            return Zero3State(self.optimizer)
        return TorchState(self.optimizer)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """engine.backward divides the loss by gradient_accumulation_steps. Collectives: stage 0/1 reduce the
        gradients in the last micro-batch's backward; stage 2/3 reduce-scatter buckets during every backward."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # not an accumulation boundary: only counts the micro-batch

    def clip(self) -> Optional[torch.Tensor]:
        """Stage 0: the global norm of the reduced gradients, clipped by us (collectives); stages 1-3 clip and
        measure the norm inside step() (None here)."""
        if self.cfg.zero.stage > 0:
            return None
        return clip_grad_norm(self.model, self.cfg.optim.grad_clip, self.ctx.groups)

    def step(self, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        """The optimizer step at the accumulation boundary (ZeRO: clip, step, all-gather the updated partitions:
        collectives; host sync: ZeRO 1-3 check the norm for inf/NaN on the host and skip the step if so), then the
        LR schedule; returns the grad norm before clipping."""
        self.engine.step()
        if grad_norm is not None:
            return grad_norm
        # On the engine's device: a CPU tensor here met the CUDA loss in the trainer's log stack (crash on CUDA).
        return torch.as_tensor(self.engine.get_global_grad_norm(), dtype=torch.float32, device=self.engine.device)

    def evaluation(self):
        """ZeRO 3 re-partitions a module's parameters after its forward, in eval as in training."""
        return eval_mode(self.model)

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Collective under ZeRO 3: full parameters inside the block (read-only), partitioned again after it."""
        if self.cfg.zero.stage != 3:
            yield
            return
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            yield
