"""Single-process training loop: LM cross-entropy + MoE aux losses, AdamW, accumulation, clipping, eval, metrics.

Host syncs: one per logged step (loss, grad norm and MoE statistics read together) and per evaluation; the other
steps run without reading device values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from moe_train.checkpoint.checkpointer import Checkpointer
from moe_train.config.schema import Config
from moe_train.config.train import TrainConfig
from moe_train.data import DataBundle, build_data
from moe_train.data.device import DevicePrefetcher
from moe_train.models.transformer import Transformer, build_model
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.data_parallel import clip_grad_norm, reduce_gradients
from moe_train.parallel.expert_parallel import CommCounter
from moe_train.parallel.parallelize import parallelize
from moe_train.training.loggers import Console, MetricsFile, Progress, build_logger
from moe_train.training.moe_stats import MoEStatsAccumulator
from moe_train.training.optim import build_optimizer, build_scheduler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; allowed here: 'auto', 'cpu'")
    return torch.device(name)


def configure_device(device: torch.device, cfg: TrainConfig) -> None:
    """Process-wide backend switches for this run's device: TF32 for float32 matmuls and convolutions (Ampere and
    later; train.tf32). CPU: nothing to set."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32, nats per token."""
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, ctx: Optional[ParallelContext] = None,
                 device: Optional[torch.device] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.ctx = ctx if ctx is not None else ParallelContext.single()
        self.rank = self.ctx.rank
        self.console = Console(self.rank)
        self.device = device if device is not None else resolve_device(cfg.train.device)
        self.comm = CommCounter()
        configure_device(self.device, cfg.train)
        torch.manual_seed(cfg.train.seed)  # init and every random routing choice follow the seed
        self.data = self.build_data()
        self.model = self.build_model()
        self.description = self.describe_model()  # before ZeRO-3 partitions the parameters
        self.engine = self.build_engine()  # None unless zero.stage >= 0
        self.optimizer, self.scheduler = self.build_optimizer_and_schedule()
        self.stats = MoEStatsAccumulator(self.model)
        self.step, self.tokens_seen = 0, 0
        self.checkpointer = Checkpointer(cfg.checkpoint, run_dir)
        self.checkpointer.resume(self)  # collective when distributed
        # Resuming (also `auto` with nothing to resume) drops the records of steps that will run again.
        self.metrics = MetricsFile(run_dir / "metrics.jsonl" if self.ctx.is_rank0 else None,
                                   resumed_step=self.step if cfg.checkpoint.resume != "none" else None)
        self.logger = build_logger(cfg.logger, run_dir, dataclasses.asdict(cfg), self.rank)

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.train.batch_size // (self.cfg.train.grad_accum_steps * self.ctx.dims.dp)

    def group(self, name: str):
        return getattr(self.ctx.groups, name) if self.ctx.groups is not None else None

    def build_data(self) -> DataBundle:
        t, dims = self.cfg.train, self.ctx.dims
        data = build_data(self.cfg.data, t.seq_len, self.micro_batch_size, self.ctx.dp_rank, dims.dp,
                          val_batches=t.eval_batches)
        data.train = DevicePrefetcher(data.train, self.device)  # pinned, non-blocking, one batch ahead
        return data

    def build_model(self) -> Transformer:
        """Full model on every rank (same seed: same weights), then each rank keeps its part (parallelize).
        Cost: the full model is allocated once per rank before sharding."""
        vocab = self.cfg.model.vocab_size
        if vocab < self.data.vocab_size:
            raise ValueError(f"model.vocab_size={vocab} is smaller than the vocabulary of "
                             f"data.tokenizer={self.cfg.data.tokenizer!r} ({self.data.vocab_size} tokens)")
        model = build_model(self.cfg.model, self.cfg.moe, self.device)
        parallelize(model, self.ctx, self.cfg.parallel, self.comm, compile_blocks=self.cfg.train.compile)
        return model

    def build_engine(self):
        """zero.stage >= 0: the DeepSpeed engine around the parallelized model, with its own optimizer and schedule
        (moe_train/parallel/zero.py). Imported only then: `import deepspeed` costs seconds."""
        if self.cfg.zero.stage < 0:
            return None
        from moe_train.parallel.zero import ZeroEngine

        return ZeroEngine(self.model, self.cfg, self.ctx, self.micro_batch_size)  # collective

    def gathered_parameters(self):
        """Context in which every parameter is whole on this rank (ZeRO 3 gathers them: collective) and may be
        read, e.g. by full_state_dict; a no-op otherwise."""
        return self.engine.gathered_parameters() if self.engine is not None else contextlib.nullcontext()

    def build_optimizer_and_schedule(self):
        """torch AdamW and the LR schedule; the engine's under zero.stage >= 0 (the same AdamW and schedule)."""
        if self.engine is not None:
            return self.engine.optimizer, self.engine.lr_scheduler
        optimizer = build_optimizer(self.model, self.cfg.optim, self.device)
        return optimizer, build_scheduler(optimizer, self.cfg.optim, self.cfg.train.max_steps)

    def autocast(self):
        if self.cfg.train.mixed_precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward_loss(self, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM cross-entropy, scaled MoE aux + z loss) of one micro-batch."""
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        with self.autocast():
            logits, aux_loss = (self.model if self.engine is None else self.engine)(inputs, return_aux=True)
        return lm_loss(logits, targets), aux_loss

    def train_step(self, collect_stats: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches: (mean LM loss, grad norm, lr used)."""
        loss, grad_norm = self.compute_gradients(collect_stats)
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            return loss, self.engine.step(grad_norm), lr  # collectives; steps the schedule too
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    def compute_gradients(self, collect_stats: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward/backward of this rank's micro-batches, gradients reduced over the layout and clipped:
        (this rank's mean LM loss, global grad norm before clipping, or None under ZeRO 1-3: see reduce_and_clip)."""
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accum):
            loss, aux_loss = self.forward_loss(*self.data.train.next_batch())
            self.backward(loss + aux_loss, last=i == accum - 1)
            loss_sum += loss.detach()
            if collect_stats:
                self.stats.add()
        return loss_sum / accum, self.reduce_and_clip()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Gradients of one micro-batch's loss, accumulated (divided by grad_accum_steps)."""
        if self.engine is None:
            (loss / self.cfg.train.grad_accum_steps).backward()
            return
        self.engine.backward(loss, last)  # collectives (see ZeroEngine.backward)

    def reduce_and_clip(self) -> Optional[torch.Tensor]:
        """Gradients reduced over the layout and clipped; the global grad norm before clipping (None under ZeRO
        1-3, whose optimizer clips and measures the norm in its step)."""
        if self.engine is not None:
            return self.engine.clip()  # collectives at stage 0
        reduce_gradients(self.model, self.group("dp"), self.group("edp"), self.ctx.dims.dp)  # collectives
        return clip_grad_norm(self.model, self.cfg.optim.grad_clip, self.ctx.groups)  # collectives

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the fixed validation batches (eval capacity factor applies)."""
        self.model.eval()
        losses = [self.forward_loss(inputs, targets)[0] for inputs, targets in self.data.val]
        self.model.train()
        total = torch.stack([torch.stack(losses).sum(), torch.tensor(float(len(losses)), device=self.device)])
        self.all_reduce_sum(total)  # collective
        return (total[0] / total[1]).item()  # host sync

    def all_reduce_sum(self, t: torch.Tensor) -> None:
        """Collective over the dp group (no-op on one process)."""
        if self.group("dp") is not None:
            torch.distributed.all_reduce(t, group=self.group("dp"))

    def should_log(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def should_eval(self, step: int) -> bool:
        every = self.cfg.train.eval_every
        return every > 0 and (step % every == 0 or step == self.cfg.train.max_steps)

    def train(self) -> dict:
        """Run to train.max_steps; returns the last logged record (with the last `val_loss` if any)."""
        t = self.cfg.train
        self.console.print0(f"run dir: {self.run_dir.resolve()}")
        self.console.print0(f"model: {self.description}; data: {self.data.num_train_tokens:,} train / "
                            f"{self.data.num_val_tokens:,} val tokens")
        progress = Progress(t.max_steps, enabled=t.progress and self.rank == 0, initial=self.step)
        last: dict = {}
        window = Window(time.perf_counter())
        try:
            while self.step < t.max_steps:
                last = self.run_one_step(window, progress, last)
        finally:
            progress.close()
            self.metrics.close()
            self.logger.finish()
        return last

    def run_one_step(self, window: "Window", progress: Progress, last: dict) -> dict:
        step = self.step + 1
        log_now = self.should_log(step)
        loss, grad_norm, lr = self.train_step(collect_stats=log_now)
        self.step = step
        tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
        window.tokens += tokens
        self.tokens_seen += tokens
        window.steps += 1
        if log_now:
            last = self.log_step(step, loss, grad_norm, lr, window)
            progress.update(0, loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if self.should_eval(step):
            with window.paused():
                last = {**last, "val_loss": self.log_eval(step)}
        if self.checkpointer.should_save(step, self.cfg.train.max_steps):
            with window.paused():
                self.checkpointer.save(self)  # collective
        progress.update(1)
        return last

    def log_step(self, step: int, loss, grad_norm, lr: float, window: "Window") -> dict:
        loss = loss.clone()
        self.all_reduce_sum(loss)  # collective: mean over dp of the ranks' mean micro-batch losses
        self.stats.all_reduce(self.group("dp"))  # collective
        values = torch.stack([loss / self.ctx.dims.dp, grad_norm.float()]).tolist()  # host sync: once per log
        if not math.isfinite(values[0]):
            raise FloatingPointError(f"training loss is {values[0]} at step {step}; lower optim.lr={self.cfg.optim.lr} "
                                     f"or enable optim.grad_clip")
        record = {"step": step, "loss": values[0], **self.stats.read(), "lr": lr, "grad_norm": values[1],
                  "a2a_bytes_per_step": self.comm.take() / max(1, window.steps),  # rank 0's
                  "tokens_per_s": window.rate(time.perf_counter())}
        self.stats.reset()
        self.metrics.write(record)
        self.logger.log(record, step)
        return record

    def log_eval(self, step: int) -> float:
        sent = self.comm.bytes_sent
        val_loss = self.evaluate()
        self.comm.bytes_sent = sent  # a2a_bytes_per_step counts training exchanges only
        record = {"step": step, "val_loss": val_loss}
        self.metrics.write(record)
        self.logger.log(record, step)
        return val_loss

    def describe_model(self) -> str:
        from moe_train.models.params import count_parameters

        counts = count_parameters(self.model)
        return f"{counts.total / 1e6:.2f}M parameters, {counts.active / 1e6:.2f}M active per token"


class Window:
    """Tokens and training wall time since the last logged step (evaluation time excluded)."""

    def __init__(self, start: float):
        self.start, self.tokens, self.steps, self.excluded = start, 0, 0, 0.0

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluation, checkpoint saves) does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    def rate(self, now: float) -> float:
        rate = self.tokens / max(now - self.start - self.excluded, 1e-9)
        self.start, self.tokens, self.steps, self.excluded = now, 0, 0, 0.0
        return rate
