"""The engine interface behind the Trainer: how a micro-batch goes forward and backward, how gradients are reduced,
clipped and applied, and who holds the weights and optimizer state (for checkpoints). One implementation per way of
holding the model:

  * LocalEngine: plain tensors on every rank; our gradient reduction over dp/edp (parallel/data_parallel.py) and
    torch AdamW. One process, or any dp x ep x tp layout without a sharding engine.
  * ZeroEngine (parallel/zero.py): DeepSpeed ZeRO stages 0-3 (`zero.stage >= 0`).
  * FSDPEngine (parallel/fsdp.py): torch FSDP2, experts sharded over their expert-data-parallel mesh
    (`fsdp.enabled=true`).

The Trainer calls only these methods, never branching on the kind (torchtitan's train_step has the same shape:
forward/backward per micro-batch, then clip and step). Engines that need DeepSpeed import it only when chosen.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional, Protocol

import torch
from torch import nn

from moe_train.checkpoint.holders import TorchState
from moe_train.config.schema import Config
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.data_parallel import clip_grad_norm, reduce_gradients
from moe_train.training.optim import build_optimizer, build_scheduler


class Engine(Protocol):
    model: nn.Module  # this rank's part of the model, unwrapped (parameter names as in checkpoints)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def forward(self, inputs: torch.Tensor,
                task_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, scaled aux loss) of one micro-batch; task_ids: each token's task (task-routed MoE layers)."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradients of one micro-batch's loss (divided by grad_accum_steps); `last`: the final
        micro-batch of the optimizer step."""

    def clip(self) -> Optional[torch.Tensor]:
        """Gradients reduced over the layout and clipped; the global norm before clipping, or None when the step
        measures it (ZeRO 1-3)."""

    def step(self, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        """Optimizer and LR-schedule step, gradients cleared; returns the global grad norm before clipping."""

    def gathered_parameters(self) -> ContextManager:
        """Inside: every parameter whole on this rank (its ep/tp shard) and readable; collective where the engine
        partitions parameters (ZeRO 3)."""

    def evaluation(self) -> ContextManager:
        """Inside: the model in eval mode for no-grad forwards; on exit back in training mode and held as before
        (FSDP2: resharded, since no backward follows to do it)."""

    def state_holder(self) -> TorchState:
        """Who holds weights and optimizer state, for checkpoints (checkpoint/holders.py)."""


def task_kwargs(task_ids: Optional[torch.Tensor]) -> dict:
    """The model's task-id argument, only when there are task ids (an engine also drives models without one)."""
    return {} if task_ids is None else {"task_ids_BS": task_ids}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    model.eval()
    try:
        yield
    finally:
        model.train()


class LocalEngine:
    """Plain tensors: our dp/edp gradient reduction, global-norm clipping and torch AdamW."""

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext, device: torch.device):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.optimizer = build_optimizer(model, cfg.optim, device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)

    def forward(self, inputs: torch.Tensor,
                task_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(inputs, return_aux=True, **task_kwargs(task_ids))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.cfg.train.grad_accum_steps).backward()

    def clip(self) -> torch.Tensor:
        groups = self.ctx.groups
        reduce_gradients(self.model, groups.dp if groups else None, groups.edp if groups else None,
                         self.ctx.dims.dp)  # collectives
        return clip_grad_norm(self.model, self.cfg.optim.grad_clip, groups)  # collectives

    def step(self, grad_norm: Optional[torch.Tensor]) -> torch.Tensor:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def gathered_parameters(self) -> ContextManager:
        return contextlib.nullcontext()

    def evaluation(self) -> ContextManager:
        return eval_mode(self.model)

    def state_holder(self) -> TorchState:
        return TorchState(self.optimizer)


def build_engine(model: nn.Module, cfg: Config, ctx: ParallelContext, device: torch.device,
                 micro_batch_size: int) -> Engine:
    """The engine config selects: ZeRO under zero.stage >= 0 (collective; `import deepspeed` costs seconds, so
    only then), FSDP2 under fsdp.enabled (parallelize already sharded the model), else local."""
    if cfg.fsdp.enabled:
        from moe_train.parallel.fsdp import FSDPEngine

        return FSDPEngine(model, cfg, ctx, device)
    if cfg.zero.stage >= 0:
        from moe_train.parallel.zero import ZeroEngine

        return ZeroEngine(model, cfg, ctx, micro_batch_size)  # collective
    return LocalEngine(model, cfg, ctx, device)
