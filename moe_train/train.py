"""`moe-train [overrides]` (also `python -m moe_train.train`): compose the Hydra config, validate it, train.

    moe-train                                   # tiny MoE on the embedded corpus
    moe-train model=tiny moe.top_k=1 train.max_steps=100 hydra.run.dir=runs/top1
    moe-train -m moe.top_k=1,2                  # one job (and directory) per value
    torchrun --nproc_per_node 2 -m moe_train.train parallel.ep=2
    deepspeed --num_gpus 2 --module moe_train.train parallel.ep=2

Outputs in the run directory (hydra.run.dir): config.yaml (resolved), metrics.jsonl, weights.safetensors + .json
(final weights and model config), .hydra/ (Hydra's record), train.log. Under a launcher every rank uses rank 0's
run directory and only rank 0 writes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import hydra
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe_train.cli_config import CONF_DIR, exit_on_config_error
from moe_train.config.schema import Config, validate_config
from moe_train.config.store import register_configs
from moe_train.interop.hf import save_weights
from moe_train.parallel.context import (ParallelContext, collective_failure_message, init_parallel,
                                        is_collective_failure, read_launch_env, shutdown)
from moe_train.parallel.parallelize import full_state_dict
from moe_train.training.trainer import Trainer, resolve_device

# Ranks other than 0 must not create their own ${now} directories or Hydra logs.
NON_ZERO_RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
                           "hydra.run.dir=."]


def setup(dcfg: DictConfig, run_dir: Path) -> tuple[Trainer, ParallelContext]:
    """Everything that can fail on bad input happens here, before the first step."""
    cfg: Config = OmegaConf.to_object(dcfg)
    env = read_launch_env()
    dims = validate_config(cfg, world_size=env.world_size)
    device = resolve_device(cfg.train.device)
    ctx = init_parallel(env, dims, device, cfg.parallel.timeout_s, cfg.parallel.backend)  # collective if world > 1
    return Trainer(cfg, agree_on_run_dir(run_dir, ctx), ctx, device), ctx


def agree_on_run_dir(run_dir: Path, ctx: ParallelContext) -> Path:
    """Collective: rank 0's run directory for everyone (each rank would otherwise resolve ${now} itself)."""
    if ctx.groups is None:
        return run_dir
    box = [str(run_dir.resolve())]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def finish(trainer: Trainer, ctx: ParallelContext, last: dict) -> None:
    with trainer.gathered_parameters():  # collective under ZeRO 3
        state = full_state_dict(trainer.model, ctx)  # collective
        if ctx.is_rank0:
            save_weights(trainer.model, trainer.run_dir / "weights.safetensors", state,
                         layout=trainer.layout())  # for moe-train-convert to-hf and moe-train-eval
    losses = "".join(f", {key} {last[key]:.4f}" for key in ("loss", "val_loss") if key in last)  # none if resumed done
    trainer.console.print0(f"done: step {trainer.step}{losses}; outputs in {trainer.run_dir}")


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def hydra_main(dcfg: DictConfig) -> Optional[float]:
    with exit_on_config_error("moe-train"):
        trainer, ctx = setup(dcfg, Path(HydraConfig.get().runtime.output_dir))
    if ctx.is_rank0:
        (trainer.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    try:
        last = trainer.train()
        finish(trainer, ctx, last)
    except RuntimeError as exc:  # a peer died or timed out: say so and leave, never hang
        if ctx.groups is None or not is_collective_failure(exc):
            raise
        print(f"moe-train: error: {collective_failure_message(exc, ctx, trainer.cfg.parallel.timeout_s)}",
              file=sys.stderr)
        shutdown(ctx, clean=False)
        sys.exit(1)
    del trainer  # see release_groups
    shutdown(ctx)
    return last.get("val_loss", last.get("loss"))


def launcher_argv(argv: list[str], rank: int) -> list[str]:
    """Drop the deepspeed launcher's --local_rank (LOCAL_RANK is in the environment too); keep ranks > 0 from
    writing Hydra outputs."""
    kept = [a for i, a in enumerate(argv) if not a.startswith("--local_rank")
            and not (i > 0 and argv[i - 1] == "--local_rank")]
    return kept + (NON_ZERO_RANK_OVERRIDES if rank > 0 else [])


def main() -> None:
    with exit_on_config_error("moe-train"):
        env = read_launch_env()
    sys.argv = [sys.argv[0]] + launcher_argv(sys.argv[1:], env.rank)
    register_configs()
    hydra_main()


if __name__ == "__main__":
    main()
