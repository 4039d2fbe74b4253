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
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch._functorch import config as functorch_config

from moe_train.checkpoint.checkpointer import Checkpointer, CheckpointParts, TrainState, find_resume_point
from moe_train.config.moe import MoEConfig
from moe_train.config.schema import Config
from moe_train.config.train import TrainConfig
from moe_train.data import DataBundle, build_data
from moe_train.data.chat import IGNORE_INDEX
from moe_train.data.device import DevicePrefetcher
from moe_train.interop.initial import load_initial_weights
from moe_train.models.transformer import Transformer, build_model
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.expert_parallel import CommCounter
from moe_train.parallel.parallelize import shard_for_training
from moe_train.training.loggers import Console, MetricsFile, Progress, build_logger
from moe_train.training.distill import Teacher, distill_kl
from moe_train.training.expert_bias import ExpertBiasUpdater
from moe_train.training.moe_stats import MoEStatsAccumulator
from moe_train.training.engine import Engine, build_engine


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


def lm_loss_sum(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy in float32, nats; number of targets counted): targets equal to IGNORE_INDEX
    (instruction data's prompt tokens) count in neither. Device tensors: no host sync."""
    total = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total, (targets_BS != IGNORE_INDEX).sum()


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the counted targets, nats per token (0 when a micro-batch has none)."""
    total, count = lm_loss_sum(logits_BSV, targets_BS)
    return total / count.clamp_min(1)


@contextlib.contextmanager
def autocast_for(device: torch.device, mixed_precision: str) -> Iterator[None]:
    """train.mixed_precision=bf16: torch.autocast to bfloat16 on `device` around the forward; none: no autocast.

    The backward runs outside it, so eager autograd computes each op's backward in its forward's dtypes (the
    router's GEMMs in float32). torch.compile would trace a compiled region's backward under the autocast active at
    its forward (`backward_pass_autocast="same_as_forward"`, torch's default: pytorch#153044), casting the router's
    float32 backward GEMMs to bf16; "off" traces it as eager runs it. A config patch, not a global setting: it holds
    while a region is traced, which happens inside this context."""
    if mixed_precision != "bf16":
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16), functorch_config.patch(backward_pass_autocast="off"):
        yield


@torch.no_grad()
def loss_sums(forward_logits, batches, device: torch.device) -> torch.Tensor:
    """float64 [summed LM loss, counted target tokens] over `batches` (no host sync); forward_logits(inputs[,
    task_ids]) -> (logits, aux). Training's evaluation and moe-train-eval share it, so both compute the same numbers."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for inputs, targets, *task_ids in batches:  # task ids: when the data carries them
        loss_sum, count = lm_loss_sum(forward_logits(inputs, *task_ids)[0], targets.to(device))
        total += torch.stack([loss_sum.double(), count.double()])
    return total


def check_task_routing(moe_cfg: MoEConfig, task_names: Optional[list[str]]) -> None:
    """Task-routed MoE layers need task ids from the data, and a task embedding row for each task."""
    if moe_cfg.router_input == "token":
        return
    if task_names is None:
        raise ValueError(f"moe.router_input={moe_cfg.router_input!r} needs task ids from the data: data=chat (records' "
                         f"\"task\") or data.task_of_domain=true (the embedded corpus's six domains)")
    if moe_cfg.num_tasks < len(task_names):
        raise ValueError(f"moe.num_tasks={moe_cfg.num_tasks} is less than the data's {len(task_names)} tasks "
                         f"{task_names}; set moe.num_tasks={len(task_names)}")


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
        torch.manual_seed(cfg.train.seed)  # every random routing choice follows the seed (init: build_model)
        self.data = self.build_data()
        resume_point = find_resume_point(cfg.checkpoint, run_dir, self.ctx.groups is not None,
                                         self.console.print0)  # collective when distributed
        self.model = self.build_model()
        self.load_initial_weights(resume_point)
        self.teacher = self.build_teacher()
        self.description = self.describe_model()  # before ZeRO-3 partitions the parameters
        self.engine = self.build_engine()  # collective when distributed
        self.stats = MoEStatsAccumulator(self.model)
        self.expert_bias = ExpertBiasUpdater(self.model, cfg.moe.bias_update_rate)
        self.state = TrainState()
        self.checkpointer = self.build_checkpointer()
        self.checkpointer.resume(resume_point)  # collective when distributed
        # Resuming (also `auto` with nothing to resume) drops the records of steps that will run again.
        self.metrics = MetricsFile(run_dir / "metrics.jsonl" if self.ctx.is_rank0 else None,
                                   resumed_step=self.step if cfg.checkpoint.resume != "none" else None)
        self.logger = build_logger(cfg.logger, run_dir, dataclasses.asdict(cfg), self.rank)

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.train.batch_size // (self.cfg.train.grad_accum_steps * self.ctx.dims.dp)

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

    def group(self, name: str):
        return getattr(self.ctx.groups, name) if self.ctx.groups is not None else None

    def build_data(self) -> DataBundle:
        t, dims = self.cfg.train, self.ctx.dims
        data = build_data(self.cfg.data, t.seq_len, self.micro_batch_size, self.ctx.dp_rank, dims.dp,
                          val_batches=t.eval_batches, say=self.console.print0)
        check_task_routing(self.cfg.moe, data.task_names)
        data.train = DevicePrefetcher(data.train, self.device)  # pinned, non-blocking, one batch ahead
        return data

    def build_model(self) -> Transformer:
        """Sharded construction: the model on the meta device, cut to this rank's part by `parallelize` (tp, ep:
        shapes only), then only that part allocated and initialised, its values the slices of the unsharded
        initialisation (models/init.py). Peak memory: this rank's part plus one (per-expert) tensor."""
        vocab = self.cfg.model.vocab_size
        if vocab < self.data.vocab_size:
            raise ValueError(f"model.vocab_size={vocab} is smaller than the vocabulary of "
                             f"data.tokenizer={self.cfg.data.tokenizer!r} ({self.data.vocab_size} tokens)")

        def shard(model: Transformer) -> None:
            shard_for_training(model, self.ctx, self.cfg, self.comm)  # freeze, parallelize: collective under FSDP

        return build_model(self.cfg.model, self.cfg.moe, self.device, seed=self.cfg.train.seed, shard=shard)

    def load_initial_weights(self, resume_point) -> None:
        """init.from into this rank's part of the model, unless a checkpoint is resumed (it wins)."""
        path = self.cfg.init.path
        if path is None:
            return
        if resume_point is not None:
            self.console.print0(f"checkpoint.resume={self.cfg.checkpoint.resume!r} found {resume_point[0]}: it wins "
                                f"over init.from={path!r}, which is not read")
            return
        load_initial_weights(self.model, self.cfg.init, self.cfg.train.seed, self.ctx.groups is not None,
                             self.console.print0)  # collective when distributed and the source is a checkpoint

    def build_teacher(self) -> Optional[Teacher]:
        """distill.teacher: a frozen model on this device (whole on every rank), or None."""
        if self.cfg.distill.teacher is None:
            return None
        return Teacher(self.cfg.distill, self.cfg.model.vocab_size, self.device, self.cfg.train.seed,
                       self.console.print0)

    def build_engine(self) -> Engine:
        return build_engine(self.model, self.cfg, self.ctx, self.device, self.micro_batch_size)

    def build_checkpointer(self) -> Checkpointer:
        parts = CheckpointParts(self.model, self.engine.state_holder(), self.scheduler, self.data.train, self.state,
                                self.cfg, self.ctx, self.device)
        return Checkpointer(self.cfg.checkpoint, self.run_dir, parts, self.console.print0)

    def gathered_parameters(self):
        """Context in which every parameter is whole on this rank and may be read, e.g. by full_state_dict
        (collective under ZeRO 3)."""
        return self.engine.gathered_parameters()

    def autocast(self):
        return autocast_for(self.device, self.cfg.train.mixed_precision)

    def forward_loss(self, inputs, targets, task_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM cross-entropy, the rest of the objective) of one micro-batch; their sum is what backward gets. The
        rest: the scaled MoE aux + z loss, and under distillation (alpha - 1) x CE + (1 - alpha) x T^2 x KL, so that
        the sum is the distillation loss while the logged loss stays the cross-entropy."""
        logits, aux_loss = self.forward_logits(inputs, task_ids)
        targets = targets.to(self.device, non_blocking=True)
        ce = lm_loss(logits, targets)
        if self.teacher is None:
            return ce, aux_loss
        return ce, aux_loss + self.distill_term(inputs, task_ids, logits, targets, ce)

    def distill_term(self, inputs, task_ids, logits, targets, ce) -> torch.Tensor:
        d = self.cfg.distill
        with self.autocast():
            teacher_logits = self.teacher.logits(*self.on_device(inputs, task_ids))
        kl = distill_kl(logits, teacher_logits, targets != IGNORE_INDEX, d.temperature)
        return (d.alpha - 1) * ce + (1 - d.alpha) * kl

    def forward_logits(self, inputs, task_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            return self.engine.forward(*self.on_device(inputs, task_ids))

    def on_device(self, *tensors) -> tuple:
        return tuple(None if t is None else t.to(self.device, non_blocking=True) for t in tensors)

    def train_step(self, collect_stats: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step over grad_accum_steps micro-batches: (mean LM loss, grad norm, lr used)."""
        loss, grad_norm = self.compute_gradients(collect_stats)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.step(grad_norm)  # collectives under ZeRO; steps the schedule too
        self.expert_bias.step(self.group("dp"))  # collective when biased routers train on several ranks
        return loss, grad_norm, lr

    def compute_gradients(self, collect_stats: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward/backward of this rank's micro-batches, gradients reduced over the layout and clipped:
        (this rank's mean LM loss, global grad norm before clipping, or None under ZeRO 1-3: see reduce_and_clip)."""
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for i in range(accum):
            loss, aux_loss = self.forward_loss(*self.data.train.next_batch())
            self.engine.backward(loss + aux_loss, last=i == accum - 1)  # collectives under ZeRO 2/3
            loss_sum += loss.detach()
            self.expert_bias.add()
            if collect_stats:
                self.stats.add()
        return loss_sum / accum, self.reduce_and_clip()

    def reduce_and_clip(self) -> Optional[torch.Tensor]:
        """Gradients reduced over the layout and clipped; the global grad norm before clipping (None under ZeRO
        1-3, whose optimizer clips and measures the norm in its step)."""
        return self.engine.clip()  # collectives

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss per counted target token over the fixed validation batches (eval capacity factor applies)."""
        return self.evaluate_sums()[0]

    @torch.no_grad()
    def evaluate_sums(self) -> tuple[float, int]:
        """(mean loss per counted token, tokens counted) over every rank's validation batches."""
        with self.engine.evaluation():
            total = loss_sums(self.forward_logits, self.data.val, self.device)
        self.all_reduce_sum(total)  # collective
        loss_sum, count = total.tolist()  # host sync
        return loss_sum / max(count, 1.0), int(count)

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
        self.state.tokens_seen += tokens
        window.steps += 1
        if log_now:
            last = self.log_step(step, loss, grad_norm, lr, window)
            progress.update(0, loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if self.should_eval(step):
            with window.paused():
                last = {**last, "val_loss": self.log_eval(step)}
        if self.checkpointer.should_save(step, self.cfg.train.max_steps):
            with window.paused():
                self.checkpointer.save()  # collective
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

    def layout(self) -> dict:
        dims = self.ctx.dims
        return {"world_size": dims.world_size, "dp": dims.dp, "ep": dims.ep, "tp": dims.tp}

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
