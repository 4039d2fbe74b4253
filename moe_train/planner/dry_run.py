"""`moe-train-plan ... --world N --dry-run`: rehearse a world-N job on one CPU, one distinct rank role at a time.

For each role, this process becomes that rank of torch's fake process group (every collective returns at once) and
runs the Trainer's own construction: the mesh and its groups (mesh.py), the model built on the meta device and cut
by `parallelize` (tp, ep, activation checkpointing, FSDP2), its parameters then materialised as fake tensors
(meta storage with a device: nothing allocated), the engine with its optimizer groups, the checkpoint placement
(which regions this rank writes), and one training step: forward and backward of a micro-batch, clipping and the
optimizer step, with the real dispatchers' all-to-alls. Fake rather than bare meta tensors because torch.autocast,
SDPA's kernel choice and FSDP2's device checks need a real device type (on meta, SDPA falls back to the math kernel
and saves an S x S matrix per head; autocast refuses the meta device).

Roles: ranks that differ in what they hold. Every (tp rank, ep rank) pair holds different shards; expert-data-
parallel replicas hold the same ones, except under FSDP2, whose trailing dp rows may be shorter: there the last
replica is rehearsed too. DeepSpeed's engine cannot run on fake tensors: under zero.stage >= 0 the step is the
local engine's and only the ZeRO optimizer groups are built (DeepSpeed's own partitioning is not rehearsed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from moe_train.checkpoint.placement import placements
from moe_train.config.parallel import ParallelDims
from moe_train.config.schema import Config
from moe_train.models.transformer import Transformer, build_model
from moe_train.parallel.expert_parallel import CommCounter
from moe_train.parallel.parallelize import shard_for_training
from moe_train.planner.plan import micro_batch_size
from moe_train.planner.profile import fake_world, micro_batch_loss
from moe_train.training.engine import build_engine


@dataclass(frozen=True)
class RoleReport:
    rank: int
    coords: str  # "edp i, ep j, tp k"
    params: int  # elements this rank stores
    experts: str  # global expert ids held, e.g. "0-0" (empty for a dense model)
    optimizer_groups: int
    written_regions: int  # checkpoint regions this rank writes
    written_params: int  # their elements (over all ranks, every parameter element is written exactly once)
    a2a_bytes: int  # sent in one micro-batch's forward and backward
    seconds: float


@dataclass(frozen=True)
class DryRunReport:
    world: int
    roles: list[RoleReport]
    seconds: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        lines = [f"dry run: {len(self.roles)} distinct rank roles of {self.world} rehearsed in {self.seconds:.1f} s "
                 f"(fake process group, fake tensors): built, placed, one training step each"]
        lines += [f"  rank {r.rank:>5} ({r.coords}): {r.params / 1e6:,.1f}M parameters, experts {r.experts or '-'}, "
                  f"{r.optimizer_groups} optimizer groups, writes {r.written_regions} checkpoint regions, "
                  f"all-to-all {r.a2a_bytes / 2 ** 20:,.0f} MiB per micro-batch ({r.seconds:.1f} s)"
                  for r in self.roles]
        return "\n".join(lines)


def role_ranks(dims: ParallelDims, fsdp: bool) -> list[int]:
    """One rank per (tp, ep) pair at edp index 0; under FSDP2 the last edp index too (rank order: mesh.py)."""
    replicas = sorted({0, dims.edp - 1}) if fsdp else [0]
    return [(edp * dims.ep + ep) * dims.tp + tp for edp in replicas for ep in range(dims.ep) for tp in range(dims.tp)]


def dry_run(cfg: Config, dims: ParallelDims, device: torch.device = torch.device("cuda")) -> DryRunReport:
    """Rehearse every role of a validated config (validate_config(cfg, world) already passed)."""
    start = time.perf_counter()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=False),
                              zero=dataclasses.replace(cfg.zero, stage=-1))
    roles = [rehearse(cfg, dims, rank) for rank in role_ranks(dims, cfg.fsdp.enabled)]
    return DryRunReport(dims.world_size, roles, time.perf_counter() - start)


def rehearse(cfg: Config, dims: ParallelDims, rank: int) -> RoleReport:
    start = time.perf_counter()
    counter = CommCounter()
    with fake_world(rank, dims.world_size, dims) as ctx:
        model = build_model(cfg.model, cfg.moe, "meta", shard=lambda m: shard_for_training(m, ctx, cfg, counter))
        with FakeTensorMode(allow_non_fake_inputs=True):
            model.to_empty(device="cpu")
            engine = build_engine(model, cfg, ctx, torch.device("cpu"), micro_batch_size(cfg, dims))
            engine.backward(micro_batch_loss(engine.forward, cfg, micro_batch_size(cfg, dims)), last=True)
            engine.step(engine.clip())  # the Trainer's step: reduction and clipping, then the optimizer
        written = [p for p in placements(model, ctx).values() if p.writer]
        return RoleReport(rank, f"edp {ctx.dp_rank // dims.ep}, ep {ctx.ep_rank}, tp {ctx.tp_rank}",
                          sum(math.prod(s.shape) for s in model.shard_specs.values()), expert_ids(model),
                          len(engine.optimizer.param_groups), len(written), sum(math.prod(p.shape) for p in written),
                          counter.bytes_sent, time.perf_counter() - start)


def expert_ids(model: Transformer) -> str:
    spec = next((s for s in model.shard_specs.values() if s.expert), None)
    if spec is None:
        return ""
    return f"{spec.offsets[0]}-{spec.offsets[0] + spec.shape[0] - 1}"
