"""Token dispatchers: move tokens to their experts' input rows and expert outputs back to their tokens.

The contract follows Megatron-Core's MoETokenDispatcher: local pre/post steps are kept apart from the communication
steps so that expert parallelism only overrides `token_dispatch` / `token_combine` (all-to-all) and can overlap them
with the local work. The local steps must never communicate.

Shape legend: T tokens, D model width, E experts, K experts per token, C capacity, R expert-input rows
(E * C in capacity mode, K * T in dropless mode), A = K * T token-expert pairs (choice-major).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moe_train.models.moe.routing import DispatchPlan


@dataclass
class ExpertBatch:
    """What this process's experts run on, and what `combine` needs to bring their output back."""

    x: torch.Tensor  # [E_local, C', D] capacity buffer or [R', D] rows grouped by local expert
    counts: torch.Tensor  # filled rows per local expert: [E_local], or [E_local, S] for S capacity segments
    meta: Any = None  # dispatcher-private state for combine (split sizes, permutations)


class LocalDispatcher:
    """All experts live in this process: the communication steps are the identity."""

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
        # One gather from x plus a zero pad row for empty capacity slots; its backward is one index_add into x.
        x_pad_TD = F.pad(x_TD, (0, 0, 0, 1))
        x_RD = x_pad_TD.index_select(0, plan.src_R)
        if plan.capacity is None:
            return x_RD
        return x_RD.view(plan.num_experts, plan.capacity, x_TD.shape[-1])

    def dispatch_postprocess(self, x: Any, plan: DispatchPlan) -> ExpertBatch:
        return ExpertBatch(x, plan.counts_E)

    def combine_preprocess(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y

    def combine_postprocess(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        d_model = y.shape[-1]
        y_AD = y.reshape(-1, d_model).index_select(0, plan.dest_A)
        weights_KT1 = plan.weights_A.to(y.dtype).view(plan.top_k, plan.num_tokens, 1)
        return (y_AD.view(plan.top_k, plan.num_tokens, d_model) * weights_KT1).sum(dim=0)

    # -- communication steps (identity for a single rank) --------------------------------------------------------
    def token_dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> Any:
        return x

    def token_combine(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y
