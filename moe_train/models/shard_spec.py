"""Where a parameter held by this process sits in the global (one-process) parameter: the one shard description.

Every model parameter has a `ShardSpec`, kept by name in `model.shard_specs` (names survive torch.compile in place,
ZeRO and FSDP wrapping; attributes on a Parameter object do not survive its replacement). The model starts with
whole specs; `apply_tp`, `apply_ep` and `apply_fsdp` (moe_train/parallel) narrow them as they split parameters.
Everything that needs to know how a parameter is partitioned reads it here: sharded initialisation
(models/init.py), checkpoint placement, gradient reduction and grad-norm grouping (parallel/data_parallel.py),
full_state_dict.

Pure data: no process groups. `over` names the mesh dimensions ("tp", "ep", FSDP2's "dp" or "edp") that hold the
other pieces.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # of the local region in the global tensor
    shape: tuple[int, ...]  # local region's shape
    expert: bool = False  # routed experts' stack: dim 0 is the global expert id; reduced over edp, not dp
    tp_dim: int | None = None  # the dim split over tp, if any
    over: tuple[str, ...] = ()  # mesh dims the pieces are spread over, in the order they were split ("tp", "ep";
    # FSDP2 adds "dp" or "edp" last, cutting dim 0, or dim 1 of expert stacks)

    @staticmethod
    def whole(shape, expert: bool = False) -> "ShardSpec":
        shape = tuple(shape)
        return ShardSpec(shape, (0,) * len(shape), shape, expert)

    def split(self, dim: int, index: int, parts: int, mesh_dim: str) -> "ShardSpec":
        """Piece `index` of `parts` equal pieces of the local region along `dim` (ValueError if it does not divide)."""
        if self.shape[dim] % parts:
            raise ValueError(f"cannot split dim {dim} of size {self.shape[dim]} into {parts} equal parts over "
                             f"{mesh_dim}")
        piece = self.chunk(index, parts, mesh_dim, dim)
        return replace(piece, tp_dim=dim) if mesh_dim == "tp" else piece

    def chunk(self, index: int, parts: int, mesh_dim: str, dim: int = 0) -> "ShardSpec":
        """Piece `index` of the local region cut along `dim` as torch.chunk (and FSDP2) cut it: rows
        [index * c, min(n, (index + 1) * c)), c = ceil(n / parts); trailing pieces may be short or empty."""
        rows = self.shape[dim]
        size = -(-rows // parts)
        first, last = min(rows, index * size), min(rows, (index + 1) * size)
        offsets = self.offsets[:dim] + (self.offsets[dim] + first,) + self.offsets[dim + 1:]
        shape = self.shape[:dim] + (last - first,) + self.shape[dim + 1:]
        return replace(self, offsets=offsets, shape=shape, over=self.over + (mesh_dim,))

    @property
    def is_whole(self) -> bool:
        return self.shape == self.global_shape

    def local_slices(self) -> tuple[slice, ...]:
        """The local region as slices of the global tensor."""
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.shape))


def whole_specs(model: nn.Module, expert_ids: set[int]) -> dict[str, ShardSpec]:
    return {name: ShardSpec.whole(p.shape, id(p) in expert_ids) for name, p in model.named_parameters()}


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """Specs by parameter name (as the unwrapped model's named_parameters() gives them); a model without
    `shard_specs` (a foreign model, e.g. HF's in the benchmarks) is whole and has no routed-expert stacks."""
    specs = getattr(model, "shard_specs", None)
    return specs if specs is not None else whole_specs(model, set())


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are part of the model's state (the routers' balancing bias), by name; replicated on every rank,
    so each is whole. Non-persistent buffers (RoPE tables) are recomputed and left out."""
    found = {}
    for module_name, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                found[f"{module_name}.{name}" if module_name else name] = buf
    return found


def tensor_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """shard_specs plus a whole spec per persistent buffer: every tensor a weights file or checkpoint holds."""
    buffers = {name: ShardSpec.whole(buf.shape) for name, buf in persistent_buffers(model).items()}
    return {**shard_specs(model), **buffers}
