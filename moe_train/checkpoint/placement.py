"""Where this rank's tensors sit in the global (one-process) tensors, and which rank writes each piece.

A checkpoint stores *chunks*: a piece of a global tensor given by its offsets and shape. Because chunks are named
in global coordinates, a checkpoint written under one layout can be read under any other (a reader copies the
overlap of every saved chunk with the region it needs). Expert stacks [E, ...] are cut into one chunk per expert,
so every expert is stored under its global expert id whatever the expert-parallel size was.

Replicated data is written once: dense tensors by the ranks of dp rank 0 (one per tp shard), expert tensors by the
ranks of expert-data-parallel rank 0 (one per ep and tp shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from moe_train.models.shard_spec import ShardSpec, shard_specs
from moe_train.parallel.context import ParallelContext


@dataclass(frozen=True)
class Placement:
    """A local tensor as a region of its global tensor."""

    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    per_expert: bool  # chunk along dim 0, one chunk per (global) expert
    writer: bool  # this rank stores the region (exactly one rank per region does)

    def chunks(self, start: int = 0, stop: int | None = None) -> list[tuple[tuple[int, ...], tuple[int, ...], slice]]:
        """(global offsets, shape, flat slice) of each chunk that elements [start, stop) of the flattened local
        tensor are stored as (default: all of it); experts are never mixed in one chunk."""
        stop = math.prod(self.shape) if stop is None else stop
        return [(tuple(o + x for o, x in zip(self.offsets, off)), shape, slice(first, end))
                for off, shape, first, end in flat_blocks(self.shape, start, stop, rows_apart=self.per_expert)]


def flat_blocks(shape: tuple[int, ...], start: int, stop: int,
                rows_apart: bool = False) -> list[tuple[tuple, tuple, int, int]]:
    """Elements [start, stop) of a row-major tensor of `shape` as rectangular blocks (offsets, shape, first, end),
    in order, each block the contiguous flat range [first, end): a partial first row, whole rows, a partial last
    row, the partial rows split the same way one dimension down (at most 2 * ndim - 1 blocks). rows_apart: one
    block per dim-0 row at most (one chunk per expert)."""
    if not shape:
        return [((), (), start, stop)] if start < stop else []
    inner = math.prod(shape[1:])
    blocks = []
    while start < stop:
        row = start // inner
        row_end = (row + 1) * inner
        if start % inner or stop < row_end or rows_apart:  # (part of) one row
            end = min(stop, row_end)
            blocks += [((row, *off), (1, *s), row * inner + a, row * inner + b)
                       for off, s, a, b in flat_blocks(shape[1:], start - row * inner, end - row * inner)]
        else:  # whole rows
            end = stop // inner * inner
            blocks.append(((row, *(0,) * (len(shape) - 1)), (end // inner - row, *shape[1:]), start, end))
        start = end
    return blocks


def placements(model: nn.Module, ctx: ParallelContext) -> dict[str, Placement]:
    """Placement of every parameter of this rank's part of the model, by parameter name."""
    return {name: param_placement(spec, ctx) for name, spec in shard_specs(model).items()}


def param_placement(spec: ShardSpec, ctx: ParallelContext) -> Placement:
    """The spec's region; written by tp rank 0 unless split over tp, and by dp rank 0 (dense) or the first edp
    replica (experts: dp ranks [0, ep) hold one copy of every expert shard), unless FSDP2 cut it over dp or edp
    (then every rank holds its own rows and writes them)."""
    writes_tp = "tp" in spec.over or ctx.tp_rank == 0
    if "dp" in spec.over or "edp" in spec.over:
        writes_dp = True
    else:
        writes_dp = ctx.dp_rank < ctx.dims.ep if spec.expert else ctx.dp_rank == 0
    return Placement(spec.global_shape, spec.offsets, spec.shape, spec.expert, writes_tp and writes_dp)


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
