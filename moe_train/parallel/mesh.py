"""One named device mesh per run, built once; its groups are handed explicitly to whoever needs them.

Rank order (innermost first): tp, ep, edp. Tensor-parallel ranks are neighbours (same node, fastest links), then
the expert-parallel ranks that exchange tokens all-to-all; `dp` is the flattened (edp, ep) dimension.

    rank = (edp_index * ep + ep_index) * tp + tp_index
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_train.config.parallel import ParallelDims


@dataclass
class ParallelGroups:
    """The process groups of one rank (None where the dimension has size 1: nothing to communicate)."""

    dims: ParallelDims
    mesh: DeviceMesh
    dp: dist.ProcessGroup | None  # dense gradients are averaged here
    ep: dist.ProcessGroup | None  # tokens are exchanged here
    edp: dist.ProcessGroup | None  # expert gradients are averaged here
    tp: dist.ProcessGroup | None
    dp_mesh: DeviceMesh  # 1-D meshes for FSDP2: dense parameters are sharded over dp, experts over edp
    edp_mesh: DeviceMesh


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelGroups:
    """Collective: every rank must call it, in the same order."""
    mesh = init_device_mesh(device_type, (dims.edp, dims.ep, dims.tp), mesh_dim_names=("edp", "ep", "tp"))
    dp_mesh = mesh["edp", "ep"]._flatten("dp")

    def group(sub: DeviceMesh, size: int) -> dist.ProcessGroup | None:
        return sub.get_group() if size > 1 else None

    return ParallelGroups(dims, mesh, group(dp_mesh, dims.dp), group(mesh["ep"], dims.ep),
                          group(mesh["edp"], dims.edp), group(mesh["tp"], dims.tp), dp_mesh, mesh["edp"])
