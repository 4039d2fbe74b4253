"""Where this rank's tensors sit in the global (one-process) tensors, and which rank writes each piece.

A checkpoint stores *chunks*: a piece of a global tensor given by its offsets and shape. Because chunks are named
in global coordinates, a checkpoint written under one layout can be read under any other (a reader copies the
overlap of every saved chunk with the region it needs). Expert stacks [E, ...] are cut into one chunk per expert,
so every expert is stored under its global expert id whatever the expert-parallel size was.

Replicated data is written once: dense tensors by the ranks of dp rank 0 (one per tp shard), expert tensors by the
ranks of expert-data-parallel rank 0 (one per ep and tp shard).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe_train.models.moe.experts import expert_param_ids
from moe_train.parallel.context import ParallelContext


@dataclass(frozen=True)
class Placement:
    """A local tensor as a region of its global tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    per_expert: bool  # chunk along dim 0, one chunk per (global) expert
    writer: bool  # this rank stores the region (exactly one rank per region does)

    def chunks(self) -> list[tuple[tuple[int, ...], tuple[int, ...], slice]]:
        """(global offsets, shape, local dim-0 slice) of each chunk this region is stored as."""
        if not self.per_expert:
            return [(self.offsets, self.shape, slice(None))]
        rest_off, rest_shape = self.offsets[1:], self.shape[1:]
        return [((self.offsets[0] + e, *rest_off), (1, *rest_shape), slice(e, e + 1)) for e in range(self.shape[0])]


def placements(model: nn.Module, ctx: ParallelContext) -> dict[str, Placement]:
    """Placement of every parameter of this rank's part of the model, by parameter name."""
    expert_ids = expert_param_ids(model)
    return {name: param_placement(p, id(p) in expert_ids, ctx) for name, p in model.named_parameters()}


def param_placement(p: nn.Parameter, is_expert: bool, ctx: ParallelContext) -> Placement:
    dims = ctx.dims
    shape = tuple(p.shape)
    global_shape, offsets = list(shape), [0] * len(shape)
    tp_dim = getattr(p, "tp_shard_dim", None)
    if tp_dim is not None and dims.tp > 1:
        global_shape[tp_dim] *= dims.tp
        offsets[tp_dim] = ctx.tp_rank * shape[tp_dim]
    if is_expert and dims.ep > 1:
        global_shape[0] *= dims.ep
        offsets[0] = ctx.ep_rank * shape[0]
    writes_tp = tp_dim is not None or ctx.tp_rank == 0  # tp-replicated tensors: tp rank 0 only
    writes_dp = ctx.dp_rank < dims.ep if is_expert else ctx.dp_rank == 0  # edp rank 0 / dp rank 0
    return Placement(tuple(global_shape), tuple(offsets), shape, is_expert, writes_tp and writes_dp)


def overlap(want_off, want_shape, have_off, have_shape) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into the wanted region, slices into the saved chunk) of their intersection; None if empty."""
    into_want, into_have = [], []
    for wo, ws, ho, hs in zip(want_off, want_shape, have_off, have_shape):
        lo, hi = max(wo, ho), min(wo + ws, ho + hs)
        if lo >= hi:
            return None
        into_want.append(slice(lo - wo, hi - wo))
        into_have.append(slice(lo - ho, hi - ho))
    return tuple(into_want), tuple(into_have)
