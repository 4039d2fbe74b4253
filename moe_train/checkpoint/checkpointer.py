"""What a training run contributes to a checkpoint and how it is restored on resume.

The Checkpointer receives the run's stateful parts (`CheckpointParts`: the model and its state holder, the LR
schedule, the data loader, the train state), never the trainer, as torchtitan's CheckpointManager receives its
states: it reads and restores those objects and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from moe_train.checkpoint import manager
from moe_train.checkpoint.holders import TorchState
from moe_train.checkpoint.placement import placements
from moe_train.checkpoint.state import load_model, load_optimizer, rank_share, restore_rng, rng_tensors
from moe_train.checkpoint.storage import ChunkReader
from moe_train.config.checkpoint import CheckpointConfig
from moe_train.models.shard_spec import persistent_buffers
from moe_train.parallel.context import ParallelContext


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclasses.dataclass
class TrainState:
    """Progress of a run: optimizer steps taken and tokens trained on (all ranks)."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens"])


@dataclasses.dataclass
class CheckpointParts:
    """Everything a checkpoint saves and restores, and what it needs to know about the run."""

    model: nn.Module  # this rank's part, unwrapped
    holder: TorchState  # who holds weights and optimizer state (the engine's: checkpoint/holders.py)
    scheduler: Any  # the LR schedule (LambdaLR), fast-forwarded on resume
    loader: Stateful  # the training data position
    train_state: TrainState
    config: Any  # the run's Config: the manifest records it; resuming checks the model shape against it
    ctx: ParallelContext
    device: torch.device


# Fields that change tensor shapes or names: resuming with any of them changed is refused with the list.
SHAPE_FIELDS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "moe_every", "tie_embeddings"),
    "moe": ("num_experts", "d_ff", "activation", "router", "num_shared_experts"),
}


ResumePoint = Optional[tuple[Path, dict]]  # (checkpoint directory, its verified manifest), or None


def find_resume_point(cfg: CheckpointConfig, run_dir: Path, distributed: bool,
                      say: Callable[[str], None]) -> ResumePoint:
    """Collective when distributed: the checkpoint that checkpoint.resume selects in <run_dir>/checkpoints (verified),
    or None. Asked before the model is built: a run that resumes does not load init.from."""
    return manager.choose(cfg.resume, run_dir / "checkpoints", distributed, say)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path, parts: CheckpointParts, say: Callable[[str], None]):
        self.cfg, self.parts, self.say = cfg, parts, say
        self.root = run_dir / "checkpoints"

    def should_save(self, step: int, max_steps: int) -> bool:
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step == max_steps)

    def save(self) -> Path:
        """Collective: every rank writes its share; returns the complete checkpoint's directory."""
        parts = self.parts
        return manager.save(self.root, save_request(parts), parts.ctx.rank, parts.ctx.groups is not None,
                            self.cfg.keep_last)

    def resume(self, chosen: ResumePoint) -> bool:
        """Collective: load `chosen` (find_resume_point's answer) into the parts; False if it is None."""
        if chosen is None:
            return False
        directory, manifest = chosen
        check_compatible(manifest, self.parts)
        restore(self.parts, directory, manifest, self.say)
        self.say(f"resumed from {directory} (step {manifest['step']}, written with layout {manifest['layout']})")
        return True


def save_request(parts: CheckpointParts) -> manager.SaveRequest:
    tensors, index, scalars = rank_share(parts.model, parts.holder, parts.ctx, manager.shard_name(parts.ctx.rank))
    rng = rng_tensors(parts.device)
    fragment = {"index": index, "rng": sorted(rng), "scalars": scalars}
    return manager.SaveRequest(parts.train_state.step, {**tensors, **rng}, fragment, manifest_extra(parts))


def manifest_extra(parts: CheckpointParts) -> dict:
    dims, cfg = parts.ctx.dims, parts.config
    layout = {"world_size": dims.world_size, "dp": dims.dp, "ep": dims.ep, "tp": dims.tp,
              "expert_tp": cfg.parallel.expert_tp, "zero_stage": cfg.zero.stage, "fsdp": cfg.fsdp.enabled}
    return {"layout": layout, "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
            "trainer": {**parts.train_state.state_dict(), "loader": parts.loader.state_dict()}}


def check_compatible(manifest: dict, parts: CheckpointParts) -> None:
    """Refuse a checkpoint of a differently shaped model, listing every difference."""
    saved, now = manifest["config"], dataclasses.asdict(parts.config)
    diffs = [f"{section}.{key}: checkpoint {saved[section][key]!r}, this run {now[section][key]!r}"
             for section, keys in SHAPE_FIELDS.items() for key in keys if saved[section][key] != now[section][key]]
    place = placements(parts.model, parts.ctx)
    tensors = manifest["tensors"]
    for name, p in place.items():
        entry = tensors.get(f"model/{name}")
        if entry is None:
            diffs.append(f"parameter {name}: missing from the checkpoint")
        elif tuple(entry["global_shape"]) != p.global_shape:
            diffs.append(f"parameter {name}: checkpoint shape {entry['global_shape']}, this run {list(p.global_shape)}")
    known = set(place) | set(persistent_buffers(parts.model))
    extra = sorted(k[len("model/"):] for k in tensors if k.startswith("model/") and k[len("model/"):] not in known)
    diffs += [f"parameter {name}: in the checkpoint, not in this model" for name in extra]
    if diffs:
        raise manager.CheckpointError("the checkpoint's model differs from this run's; resuming needs the same "
                                      "model shape:\n  " + "\n  ".join(diffs))


def restore(parts: CheckpointParts, directory: Path, manifest: dict, say: Callable[[str], None]) -> None:
    reader = ChunkReader(directory, manifest["tensors"])
    place = placements(parts.model, parts.ctx)
    missing = load_model(parts.model, parts.holder, reader, place)
    if missing:
        say(f"the checkpoint has no {', '.join(missing)}: starting from their initial values (zero bias)")
    load_optimizer(parts.model, parts.holder, reader, place, manifest["optimizer_scalars"])
    state = manifest["trainer"]
    parts.train_state.load_state_dict(state)
    fast_forward_schedule(parts.scheduler, parts.train_state.step)
    parts.loader.load_state_dict(state["loader"])
    restore_rank_rng(parts, reader, manifest, say)


def fast_forward_schedule(scheduler, step: int) -> None:
    """The LR is a function of the step and this run's optim config (which may differ from the saved one)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def restore_rank_rng(parts: CheckpointParts, reader: ChunkReader, manifest: dict, say: Callable[[str], None]) -> None:
    """Same layout: each rank continues its own random stream. Another layout: the streams cannot continue (ranks
    differ), so each rank reseeds from (seed, step, rank): deterministic, and said."""
    rank = parts.ctx.rank
    same_layout = manifest["layout"]["world_size"] == parts.ctx.dims.world_size
    entry = manifest["rng"].get(str(rank))
    if same_layout and entry is not None:
        handle = reader.handle(entry["file"])
        restore_rng({key: handle.get_tensor(key) for key in entry["keys"]}, parts.device)
        return
    torch.manual_seed(parts.config.train.seed + 1_000_003 * parts.train_state.step + rank)
    say("the world size changed: random streams (noisy gating, second-expert sampling) were reseeded from "
        "(train.seed, step, rank)")
