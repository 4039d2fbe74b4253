"""Checkpoint save and load time and size, one process, for the `tiny` preset and a ~100M-parameter MoE.

Each model trains one step (so AdamW has its state), then is saved `--repeats` times and resumed `--repeats` times
into the same Trainer (verification with SHA-256 of every file, then the chunk reads into the model and AdamW). Reported: medians, bytes on disk, and the bytes per parameter.

    python bench/checkpoint_io.py --out bench/results/checkpoint_io.md

Save time includes writing, fsync and hashing; the page cache is warm for the load (the files were just written),
so the load time is the CPU cost of reading and verifying, not the disk's.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe_train.checkpoint.checkpointer import Checkpointer, find_resume_point
from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.models.params import count_parameters
from moe_train.training.trainer import Trainer

MODELS = {
    "tiny": [],
    "moe_100m": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=2048",
                 "moe.d_ff=1024", "model.vocab_size=256"],
}
COMMON = ["train.seq_len=64", "train.batch_size=2", "train.max_steps=1", "train.progress=false",
          "train.eval_every=0", "data.embedded_size=200000"]


def trainer_for(model: str, run_dir: Path, *extra: str) -> Trainer:
    cfg = compose_config([*MODELS[model], *COMMON, *extra])
    validate_config(cfg)
    return Trainer(cfg, run_dir)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model: str, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        trainer = trainer_for(model, run_dir, f"checkpoint.keep_last={repeats + 1}")
        trainer.train_step(collect_stats=False)
        saves, paths = [], []
        for i in range(repeats):
            trainer.step = i + 1
            saves.append(timed(lambda: paths.append(trainer.checkpointer.save())))
        size = sum(f.stat().st_size for f in paths[-1].iterdir())
        loader = Checkpointer(dataclasses.replace(trainer.cfg.checkpoint, resume=str(paths[-1])), run_dir,
                              trainer.checkpointer.parts, trainer.console.print0)
        loads = [timed(lambda: loader.resume(find_resume_point(loader.cfg, run_dir, False, print)))
                 for _ in range(repeats)]  # verification (SHA-256 of every file) included, as at launch
        params = count_parameters(trainer.model).total
    return {"model": model, "params": params, "bytes": size, "save_s": statistics.median(saves),
            "load_s": statistics.median(loads)}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [f"$ python bench/checkpoint_io.py --repeats {args.repeats}", "",
             f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
             f"torch {torch.__version__}; float32 weights and AdamW state; one process", "",
             "| model | parameters | checkpoint size | bytes / parameter | save s | load s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['bytes'] / 2**20:.1f} MiB | "
                     f"{r['bytes'] / r['params']:.1f} | {r['save_s']:.2f} | {r['load_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    rows = [measure(m, args.repeats) for m in args.models.split(",")]
    text = report(rows, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
