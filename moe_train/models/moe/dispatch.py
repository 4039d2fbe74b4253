"""Token dispatchers: move tokens to their experts' input rows and expert outputs back to their tokens.

The contract follows Megatron-Core's MoETokenDispatcher: local pre/post steps are kept apart from the communication
steps so that expert parallelism only overrides `token_dispatch` / `token_combine` (all-to-all) and can overlap them
with the local work. The local steps must never communicate.

Shape legend: T tokens, D model width, E experts, C capacity, R expert-input rows (E * C in capacity mode, one per
token-expert pair in dropless mode). How rows are gathered and combined is the plan's business (routing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from moe_train.models.moe.routing import DispatchPlan


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
        # The plan's gather from x (routing.py: scatter-free for token choice), shaped as its expert buffer.
        x_RD = plan.gather(x_TD, self.use_scatter_free(x_TD))
        if plan.capacity is None:
            return x_RD
        return x_RD.view(plan.num_experts, plan.capacity, x_TD.shape[-1])

    def dispatch_postprocess(self, x: Any, plan: DispatchPlan) -> ExpertBatch:
        return ExpertBatch(x, plan.counts_E)

    def combine_preprocess(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y

    def combine_postprocess(self, y: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        # Each token's weighted sum over its rows, accumulated in float32 (routing.py).
        return plan.combine(y.reshape(-1, y.shape[-1]), self.use_scatter_free(y))

    # -- communication steps (identity for a single rank) --------------------------------------------------------
    def batch_sum(self, counts: torch.Tensor) -> torch.Tensor:
        """counts summed over every rank holding other tokens of the batch (moe.aux_loss_scope=global_batch);
        one process holds them all."""
        return counts

    def token_dispatch(self, x: torch.Tensor, plan: DispatchPlan) -> Any:
        return x

    def token_combine(self, y: torch.Tensor, plan: DispatchPlan, batch: ExpertBatch) -> torch.Tensor:
        return y
