"""Expert parallelism: experts sharded over the ep ranks, tokens exchanged with all-to-all.

Shape legend: T tokens, D model width, E experts (global), L = E / P local experts, P expert-parallel ranks,
C capacity, R rows this rank dispatches, Q rows it receives.

Expert e lives on ep rank e // L. Every collective below is marked; each rank of the ep group must run the same
MoE layers in the same order (they do: all ranks run the same micro-batches of the same model). Routing and dropping
are decided on each rank's own tokens (as GShard and DeepSpeed do), so a token's result does not depend on the
layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from moe_train.models.moe.dispatch import ExpertBatch, LocalDispatcher
from moe_train.models.moe.experts import has_values
from moe_train.models.moe.layer import MoELayer
from moe_train.models.moe.routing import DispatchPlan
from moe_train.parallel.sharding import shard_param


class CommCounter:
    """Bytes this rank sends to other ranks in all-to-all exchanges, forward and backward (host-side arithmetic on
    shapes and split sizes already known: no sync)."""

    def __init__(self):
        self.bytes_sent = 0

    def take(self) -> int:
        sent, self.bytes_sent = self.bytes_sent, 0
        return sent


def _bytes_to_others(x: torch.Tensor, splits: list[int] | None, rank: int, size: int) -> int:
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
    rows = sum(splits) - splits[rank] if splits is not None else x.shape[0] * (size - 1) // size
    return rows * row_bytes


def all_to_all(x: torch.Tensor, group: dist.ProcessGroup, send: list[int] | None = None,
               recv: list[int] | None = None, counter: CommCounter | None = None) -> torch.Tensor:
    """Collective: differentiable all_to_all_single over dim 0 (its backward is the reverse exchange); equal
    splits when send/recv are None. Waits for the result (no overlap yet). The counter gets the bytes sent to other
    ranks now and, through a gradient hook, those of the reverse exchange in backward."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), recv, send, group)
    out = funcol.wait_tensor(out) if isinstance(out, funcol.AsyncCollectiveTensor) else out
    if counter is not None:
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        counter.bytes_sent += _bytes_to_others(x, send, rank, size)
        if out.requires_grad:
            back = _bytes_to_others(out, recv, rank, size)
            out.register_hook(lambda grad: setattr(counter, "bytes_sent", counter.bytes_sent + back))
    return out


def exchange_counts(counts_E: torch.Tensor, group: dist.ProcessGroup, ep: int) -> torch.Tensor:
    """Collective: how many rows each source rank sends to each of my local experts, [P, L] (no autograd)."""
    recv = torch.empty_like(counts_E)
    dist.all_to_all_single(recv, counts_E.contiguous(), group=group)
    return recv.view(ep, -1)


def expert_major_order(counts_PL: list[list[int]]) -> torch.Tensor:
    """Row permutation from (source rank, local expert) blocks, as received, to (local expert, source rank)."""
    starts, total = [], 0
    for row in counts_PL:
        starts.append([])
        for n in row:
            starts[-1].append(total)
            total += n
    blocks = [torch.arange(starts[p][l], starts[p][l] + counts_PL[p][l])
              for l in range(len(counts_PL[0])) for p in range(len(counts_PL))]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)


def even_parts(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def balanced_splits(rows: int, ep: int, local_experts: int) -> tuple[list[int], list[list[int]]]:
    """Split sizes of a perfectly balanced exchange: this rank's rows dealt evenly over the ep ranks, and as many
    received from each, dealt evenly over the local experts ([P, L] counts)."""
    send = even_parts(rows, ep)
    return send, [even_parts(n, local_experts) for n in send]


class BatchSumDispatcher(LocalDispatcher):
    """The local dispatcher whose `batch_sum` adds the counts of every data- and expert-parallel rank (the global
    batch's load, for moe.aux_loss_scope=global_batch). batch_group None: this rank holds the whole batch."""

    def __init__(self, batch_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.batch_group = batch_group

    @torch.compiler.disable
    def batch_sum(self, counts: torch.Tensor) -> torch.Tensor:
        if self.batch_group is None:
            return counts
        total = counts.detach().clone()
        dist.all_reduce(total, group=self.batch_group)  # collective: E + 1 numbers per layer and micro-batch
        return total


class AllToAllDispatcher(BatchSumDispatcher):
    """Capacity: equal-split all-to-all of the [E, C, D] buffer, local experts run on [L, P*C, D].
    Dropless: per-expert counts exchanged first (a host sync), then a variable-split all-to-all."""

    def __init__(self, group: dist.ProcessGroup, ep: int, counter: CommCounter | None = None):
        super().__init__()
        self.group, self.ep = group, ep
        self.counter = counter if counter is not None else CommCounter()

    # Both communication steps run eagerly under train.compile (graph breaks: collectives, host-read split sizes).
    @torch.compiler.disable
    def token_dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> Any:
        counts_PL = exchange_counts(plan.counts_E, self.group, self.ep)  # collective
        if plan.capacity is not None:
            return all_to_all(x.view(-1, x.shape[-1]), self.group, counter=self.counter), counts_PL, None
        if has_values(plan.counts_E):
            send = plan.counts_E.view(self.ep, -1).sum(1).tolist()  # host sync: split sizes
            counts = counts_PL.tolist()  # host sync
        else:  # meta/fake tensors (planner, dry run): nothing to read, routing assumed balanced
            send, counts = balanced_splits(x.shape[0], self.ep, plan.num_experts // self.ep)
        recv = [sum(row) for row in counts]
        received = all_to_all(x, self.group, send, recv, self.counter)  # collective
        return received, counts_PL, (send, recv, expert_major_order(counts).to(x.device))

    def dispatch_postprocess(self, x: Any, plan: DispatchPlan) -> ExpertBatch:
        received, counts_PL, splits = x
        if plan.capacity is None:
            return ExpertBatch(received.index_select(0, splits[2]), counts_PL.sum(0), splits)
        P, C, D = self.ep, plan.capacity, received.shape[-1]
        x_LQD = received.view(P, -1, C, D).transpose(0, 1).reshape(-1, P * C, D)
        return ExpertBatch(x_LQD, counts_PL.t().contiguous())

    def combine_preprocess(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        if plan.capacity is None:
            inverse = torch.argsort(batch.meta[2])
            return y.index_select(0, inverse)
        P, C, D = self.ep, plan.capacity, y.shape[-1]
        return y.view(-1, P, C, D).transpose(0, 1).reshape(-1, D)

    @torch.compiler.disable
    def token_combine(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        if plan.capacity is None:
            send, recv, _ = batch.meta
            return all_to_all(y, self.group, recv, send, self.counter)  # collective: the reverse exchange
        out = all_to_all(y, self.group, counter=self.counter)  # collective
        return out.view(plan.num_experts, plan.capacity, -1)


def apply_ep(model: nn.Module, group: dist.ProcessGroup | None, ep_rank: int, ep: int,
             counter: CommCounter | None = None) -> None:
    """Shard every MoE layer's experts over the ep ranks and install the all-to-all dispatcher (all layers share
    `counter`). Expert e stays on ep rank e // (E / ep); also on the meta device (sharded construction)."""
    if ep == 1:
        return
    for prefix, moe in [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]:
        for name, _ in moe.experts.named_parameters():
            shard_param(model, f"{prefix}.experts.{name}", 0, ep_rank, ep, "ep")
        moe.dispatcher = AllToAllDispatcher(group, ep, counter)


def apply_batch_scope(model: nn.Module, group: dist.ProcessGroup | None, scope: str) -> None:
    """moe.aux_loss_scope=global_batch over several data-parallel ranks: every MoE layer's dispatcher sums the
    balancing counts over `group` (the dp group: all ranks holding different tokens, ep ranks included)."""
    if scope != "global_batch" or group is None:
        return
    for moe in (m for m in model.modules() if isinstance(m, MoELayer)):
        if isinstance(moe.dispatcher, BatchSumDispatcher):
            moe.dispatcher.batch_group = group
        else:
            moe.dispatcher = BatchSumDispatcher(group)


def capacity_a2a_bytes(num_moe_layers: int, micro_batches: int, num_experts: int, capacity: int, d_model: int,
                       ep: int, element_size: int) -> int:
    """Bytes one rank sends per optimizer step in capacity mode: per layer and micro-batch, four exchanges (dispatch
    and combine, forward and backward) of the [E, C, D] buffer, of which the (ep - 1) / ep going to other ranks."""
    return 4 * num_moe_layers * micro_batches * num_experts * (ep - 1) // ep * capacity * d_model * element_size

