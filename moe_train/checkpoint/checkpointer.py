"""The trainer's side of checkpoints: what a `Trainer` contributes to a save and how it is restored on resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_train.checkpoint import manager
from moe_train.checkpoint.holders import state_holder
from moe_train.checkpoint.placement import placements
from moe_train.checkpoint.state import load_model, load_optimizer, rank_share, restore_rng, rng_tensors
from moe_train.checkpoint.storage import ChunkReader
from moe_train.config.checkpoint import CheckpointConfig

if TYPE_CHECKING:
    from moe_train.training.trainer import Trainer

# Fields that change tensor shapes or names: resuming with any of them changed is refused with the list.
SHAPE_FIELDS = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "moe_every", "tie_embeddings"),
    "moe": ("num_experts", "d_ff", "activation", "router", "num_shared_experts"),
}


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path):
        self.cfg = cfg
        self.root = run_dir / "checkpoints"

    def should_save(self, step: int, max_steps: int) -> bool:
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step == max_steps)

    def save(self, trainer: "Trainer") -> Path:
        """Collective: every rank writes its share; returns the complete checkpoint's directory."""
        request = save_request(trainer)
        return manager.save(self.root, request, trainer.rank, trainer.ctx.groups is not None, self.cfg.keep_last)

    def resume(self, trainer: "Trainer") -> bool:
        """Collective: load the checkpoint that checkpoint.resume selects into `trainer`; False if none."""
        chosen = manager.choose(self.cfg.resume, self.root, trainer.ctx.groups is not None,
                                trainer.console.print0)
        if chosen is None:
            return False
        directory, manifest = chosen
        check_compatible(manifest, trainer)
        restore(trainer, directory, manifest)
        trainer.console.print0(f"resumed from {directory} (step {manifest['step']}, written with layout "
                               f"{manifest['layout']})")
        return True


def save_request(trainer: "Trainer") -> manager.SaveRequest:
    tensors, index, scalars = rank_share(trainer.model, holder_of(trainer), trainer.ctx,
                                         manager.shard_name(trainer.rank))
    rng = rng_tensors(trainer.device)
    fragment = {"index": index, "rng": sorted(rng), "scalars": scalars}
    return manager.SaveRequest(trainer.step, {**tensors, **rng}, fragment, manifest_extra(trainer))


def holder_of(trainer: "Trainer"):
    return state_holder(trainer.optimizer, trainer.cfg.zero.stage)


def manifest_extra(trainer: "Trainer") -> dict:
    dims, cfg = trainer.ctx.dims, trainer.cfg
    layout = {"world_size": dims.world_size, "dp": dims.dp, "ep": dims.ep, "tp": dims.tp,
              "expert_tp": cfg.parallel.expert_tp, "zero_stage": cfg.zero.stage}
    return {"layout": layout, "config": json.loads(json.dumps(dataclasses.asdict(cfg))),
            "trainer": {"step": trainer.step, "tokens": trainer.tokens_seen,
                        "loader": trainer.data.train.state_dict()}}


def check_compatible(manifest: dict, trainer: "Trainer") -> None:
    """Refuse a checkpoint of a differently shaped model, listing every difference."""
    saved, now = manifest["config"], dataclasses.asdict(trainer.cfg)
    diffs = [f"{section}.{key}: checkpoint {saved[section][key]!r}, this run {now[section][key]!r}"
             for section, keys in SHAPE_FIELDS.items() for key in keys if saved[section][key] != now[section][key]]
    place = placements(trainer.model, trainer.ctx)
    tensors = manifest["tensors"]
    for name, p in place.items():
        entry = tensors.get(f"model/{name}")
        if entry is None:
            diffs.append(f"parameter {name}: missing from the checkpoint")
        elif tuple(entry["global_shape"]) != p.global_shape:
            diffs.append(f"parameter {name}: checkpoint shape {entry['global_shape']}, this run {list(p.global_shape)}")
    extra = sorted(k[len("model/"):] for k in tensors if k.startswith("model/") and k[len("model/"):] not in place)
    diffs += [f"parameter {name}: in the checkpoint, not in this model" for name in extra]
    if diffs:
        raise manager.CheckpointError("the checkpoint's model differs from this run's; resuming needs the same "
                                      "model shape:\n  " + "\n  ".join(diffs))


def restore(trainer: "Trainer", directory: Path, manifest: dict) -> None:
    reader = ChunkReader(directory, manifest["tensors"])
    place = placements(trainer.model, trainer.ctx)
    holder = holder_of(trainer)
    load_model(trainer.model, holder, reader, place)
    load_optimizer(trainer.model, holder, reader, place, manifest["optimizer_scalars"])
    state = manifest["trainer"]
    trainer.step, trainer.tokens_seen = int(state["step"]), int(state["tokens"])
    fast_forward_schedule(trainer.scheduler, trainer.step)
    trainer.data.train.load_state_dict(state["loader"])
    restore_rank_rng(trainer, reader, manifest)


def fast_forward_schedule(scheduler, step: int) -> None:
    """The LR is a function of the step and this run's optim config (which may differ from the saved one)."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


def restore_rank_rng(trainer: "Trainer", reader: ChunkReader, manifest: dict) -> None:
    """Same layout: each rank continues its own random stream. Another layout: the streams cannot continue (ranks
    differ), so each rank reseeds from (seed, step, rank): deterministic, and said."""
    same_layout = manifest["layout"]["world_size"] == trainer.ctx.dims.world_size
    entry = manifest["rng"].get(str(trainer.rank))
    if same_layout and entry is not None:
        handle = reader.handle(entry["file"])
        restore_rng({key: handle.get_tensor(key) for key in entry["keys"]}, trainer.device)
        return
    torch.manual_seed(trainer.cfg.train.seed + 1_000_003 * trainer.step + trainer.rank)
    trainer.console.print0("the world size changed: random streams (noisy gating, second-expert sampling) were "
                           "reseeded from (train.seed, step, rank)")
