"""Rank-0 side effects behind objects: console printing, progress bar, metrics file and experiment logger.

Every object has a null form for non-zero ranks (and for `logger=none`), so the loop never asks "am I rank 0?".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from moe_train.config.logging import LoggingConfig


class Console:
    """`print0`: prints on rank 0 only."""

    def __init__(self, rank: int = 0):
        self.enabled = rank == 0

    def print0(self, *args: Any) -> None:
        if self.enabled:
            print(*args, flush=True)


class Progress:
    """tqdm bar showing loss and tokens/s on rank 0; inert elsewhere or when disabled."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, steps: int = 1, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsFile:
    """One JSON object per line, flushed per record (a killed run keeps what it logged)."""

    def __init__(self, path: Optional[Path], resumed_step: Optional[int] = None):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_step is not None and path.exists():
                self.drop_after(path, resumed_step)
        self.file = open(path, "a") if path is not None else None

    @staticmethod
    def drop_after(path: Path, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint: drop their records (and a torn last line)."""
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class NullLogger:
    def log(self, record: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger(NullLogger):
    """wandb run in <run dir>/wandb; offline unless logger.mode=online (works with no network)."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict):
        import wandb

        self.run = wandb.init(project=cfg.project, name=cfg.run_name or run_dir.name, dir=str(run_dir),
                              mode=cfg.mode, config=config)

    def log(self, record: dict, step: int) -> None:
        self.run.log(flatten(record), step=step)

    def finish(self) -> None:
        self.run.finish()


def flatten(record: dict, prefix: str = "") -> dict:
    """{'expert_load': {'0': [a, b]}} -> {'expert_load/0/0': a, 'expert_load/0/1': b} for scalar-only backends."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            flat.update(flatten(dict(enumerate(value)), f"{name}/"))
        else:
            flat[name] = value
    return flat


def build_logger(cfg: LoggingConfig, run_dir: Path, config: dict, rank: int = 0) -> NullLogger:
    if rank != 0 or cfg.backend == "none":
        return NullLogger()
    return WandbLogger(cfg, run_dir, config)
