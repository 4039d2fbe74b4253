"""Token dispatchers: move tokens to their experts' input rows and expert outputs back to their tokens.

The contract follows Megatron-Core's MoETokenDispatcher: local pre/post steps are kept apart from the communication
steps so that expert parallelism only overrides `token_dispatch` / `token_combine` (all-to-all) and can overlap them
with the local work. The local steps must never communicate.

Shape legend: T tokens, D model width, E experts, K experts per token, C capacity, R expert-input rows
(E * C in capacity mode, K * T in dropless mode), A = K * T token-expert pairs (choice-major).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from moe_train.models.moe.routing import DispatchPlan


class _GatherRows(torch.autograd.Function):
    """out_M = x_N[index_M] whose backward is a gather as well: grad_x[n] = sum_k grad_out[inverse_KN[k, n]].

    torch's index_select backward is an index_add: on CUDA one atomic add per element (two passes of K * T * D
    atomics per MoE layer, forward and combine), with 16-bit rounding in arrival order. Every row of a dispatch plan
    has one source and every source K known rows (the plan's inverse maps), so both directions are plain gathers.
    `pad_x` / `pad_grad`: index_M may name row N, inverse_KN row M: a zero row appended (empty slot, dropped pair).
    """

    @staticmethod
    def forward(ctx, x_ND, index_M, inverse_KN, pad_x: bool, pad_grad: bool):
        ctx.save_for_backward(inverse_KN)
        ctx.pad_grad = pad_grad
        return (F.pad(x_ND, (0, 0, 0, 1)) if pad_x else x_ND).index_select(0, index_M)

    @staticmethod
    def backward(ctx, grad_MD):
        (inverse_KN,) = ctx.saved_tensors
        grad = F.pad(grad_MD, (0, 0, 0, 1)) if ctx.pad_grad else grad_MD
        grad_KND = grad.index_select(0, inverse_KN.reshape(-1)).view(*inverse_KN.shape, grad_MD.shape[-1])
        accumulate = torch.promote_types(grad_MD.dtype, torch.float32)  # float32 for 16-bit grads, else their own
        grad_ND = grad_KND[0] if inverse_KN.shape[0] == 1 else grad_KND.sum(0, dtype=accumulate)
        return grad_ND.to(grad_MD.dtype), None, None, None, None


def gather_rows(x_ND: torch.Tensor, index_M: torch.Tensor, inverse_KN: torch.Tensor, pad_x: bool = False,
                pad_grad: bool = False, scatter_free: bool = True) -> torch.Tensor:
    """x_ND[index_M] (row N: zeros when pad_x). scatter_free: the backward is _GatherRows' gather (accelerators);
    else torch's index_select, whose backward index_add is faster on CPU (measured: the gather backward cost the
    tiny preset's MoE layer ~5% there), where there are no atomics to avoid."""
    if scatter_free:
        return _GatherRows.apply(x_ND, index_M, inverse_KN, pad_x, pad_grad)
    return (F.pad(x_ND, (0, 0, 0, 1)) if pad_x else x_ND).index_select(0, index_M)


@dataclass
class ExpertBatch:
    """What this process's experts run on, and what `combine` needs to bring their output back."""

    x: torch.Tensor  # [E_local, C', D] capacity buffer or [R', D] rows grouped by local expert
    counts: torch.Tensor  # filled rows per local expert: [E_local], or [E_local, S] for S capacity segments
    meta: Any = None  # dispatcher-private state for combine (split sizes, permutations)


class LocalDispatcher:
    """All experts live in this process: the communication steps are the identity.

    scatter_free: row gathers whose backward is a gather too (`gather_rows`); None = on accelerators only."""

    def __init__(self, scatter_free: Optional[bool] = None):
        self.scatter_free = scatter_free

    def use_scatter_free(self, x: torch.Tensor) -> bool:
        return self.scatter_free if self.scatter_free is not None else x.device.type != "cpu"

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExpertBatch:
        """x_TD -> expert input: [E, C, D] (capacity) or [R, D] grouped by expert with plan.counts_E (dropless)."""
        x = self.dispatch_preprocess(x_TD, plan)
        return self.dispatch_postprocess(self.token_dispatch(x, plan), plan)

    def combine(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        """Expert output (the layout of batch.x) -> y_TD, the weighted sum over each token's kept pairs."""
        y = self.combine_preprocess(y, plan, batch)
        y = self.token_combine(y, plan, batch)
        return self.combine_postprocess(y, plan)

    # -- local steps (no communication) -------------------------------------------------------------------------
    def dispatch_preprocess(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # One gather from x (plus a zero pad row for empty capacity slots); scatter-free, its backward gathers each
        # token's K rows (a dropped pair reads the zero row R).
        capacity = plan.capacity is not None
        rows_KT = (torch.where(plan.kept_A, plan.dest_A, plan.src_R.numel()) if capacity else plan.dest_A)
        x_RD = gather_rows(x_TD, plan.src_R, rows_KT.view(plan.top_k, -1), pad_x=capacity, pad_grad=capacity,
                           scatter_free=self.use_scatter_free(x_TD))
        if not capacity:
            return x_RD
        return x_RD.view(plan.num_experts, plan.capacity, x_TD.shape[-1])

    def dispatch_postprocess(self, x: Any, plan: DispatchPlan) -> ExpertBatch:
        return ExpertBatch(x, plan.counts_E)

    def combine_preprocess(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y

    def combine_postprocess(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # Weighted sum over each token's K pairs in the weights' dtype (float32): a 16-bit y is promoted by the
        # multiply, so the K-term sum and the router weights' gradient are not rounded to 16 bits. Cost: a
        # [K, T, D] float32 product (the H100 profile in docs/GPU.md); a 16-bit product would halve that traffic.
        d_model = y.shape[-1]
        # Scatter-free backward: each row's gradient is its pair's (an empty slot's, pair A, is the zero row).
        y_AD = gather_rows(y.reshape(-1, d_model), plan.dest_A, plan.pair_R.view(1, -1),
                           pad_grad=plan.capacity is not None, scatter_free=self.use_scatter_free(y))
        weights_KT1 = plan.weights_A.view(plan.top_k, plan.num_tokens, 1)
        return (y_AD.view(plan.top_k, plan.num_tokens, d_model) * weights_KT1).sum(dim=0)

    # -- communication steps (identity for a single rank) --------------------------------------------------------
    def token_dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> Any:
        return x

    def token_combine(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y
