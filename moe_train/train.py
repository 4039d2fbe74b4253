"""`moe-train [overrides]` (also `python -m moe_train.train`): compose the Hydra config, validate it, train.

    moe-train                                   # tiny MoE on the embedded corpus
    moe-train model=tiny moe.top_k=1 train.max_steps=100 hydra.run.dir=runs/top1
    moe-train -m moe.top_k=1,2                  # one job (and directory) per value

Outputs in the run directory (hydra.run.dir): config.yaml (resolved), metrics.jsonl, weights.safetensors + .json
(final weights and model config), .hydra/ (Hydra's record), train.log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe_train.cli_config import CONF_DIR, exit_on_config_error
from moe_train.config.schema import Config, validate_config
from moe_train.config.store import register_configs
from moe_train.interop.hf import save_weights
from moe_train.training.trainer import Trainer


def setup(dcfg: DictConfig, run_dir: Path) -> Trainer:
    """Everything that can fail on bad input happens here, before the first step."""
    cfg: Config = OmegaConf.to_object(dcfg)
    validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return Trainer(cfg, run_dir)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def hydra_main(dcfg: DictConfig) -> Optional[float]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with exit_on_config_error("moe-train"):
        trainer = setup(dcfg, run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    last = trainer.train()
    save_weights(trainer.model, run_dir / "weights.safetensors")  # convertible with `moe-train-convert to-hf`
    trainer.console.print0(f"done: step {trainer.step}, loss {last.get('loss', float('nan')):.4f}"
                           + (f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else "")
                           + f"; outputs in {run_dir.resolve()}")
    return last.get("val_loss", last.get("loss"))


def main() -> None:
    register_configs()
    hydra_main()


if __name__ == "__main__":
    main()
