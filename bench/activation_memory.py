"""Activation memory and step time of train.activation_checkpointing none / selective / full, one process.

For each mode, in a fresh process (so that peaks do not mix): the activation bytes autograd keeps for backward at
the end of one micro-batch's forward (distinct storages packed by a saved-tensors hook, weights excluded: exact),
the process's peak resident
memory over the timed training steps above its resident memory before them (after a warm-up step, so AdamW's state
exists; the peak counter is reset through /proc/self/clear_refs, so Linux only; glibc made to return freed
blocks; coarse: includes gradients, the optimizer step's temporaries and the recomputation's transients), and the
median step time. Ratios to `none` are the figures to read; absolute times on this noisy machine mean little.

    python bench/activation_memory.py --out bench/results/activation_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("none", "selective", "full")
# glibc keeps freed heap memory resident (so the peak of one step would hide in the next step's baseline); with
# these, blocks of 64 KiB and more are mmap'ed and handed back on free, and RSS follows the live tensors.
GLIBC_RETURNS_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "moe.d_ff=512",
         "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=-1"]  # the tiny preset's shape, dropless
COMMON = ["train.progress=false", "train.eval_every=0", "train.max_steps=100", "data.embedded_size=400000"]


def measure(mode: str, batch: int, seq: int, steps: int) -> dict:
    from moe_train.cli_config import compose_config
    from moe_train.config import validate_config
    from moe_train.training.trainer import Trainer

    args = [*MODEL, *COMMON, f"train.batch_size={batch}", f"train.seq_len={seq}",
            f"train.activation_checkpointing={mode}"]
    cfg = compose_config(args)
    validate_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp))
        trainer.train_step(collect_stats=False)  # warm-up: AdamW state exists, allocator warm
        saved = saved_bytes(trainer)
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) restarts from the current RSS
        before = proc_status_bytes("VmRSS")
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step(collect_stats=False)
            times.append(time.perf_counter() - start)
        peak = proc_status_bytes("VmHWM") - before
    return {"mode": mode, "saved_bytes": saved, "peak_rss_growth": peak, "step_s": statistics.median(times)}


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (kB there)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def saved_bytes(trainer) -> int:
    """Bytes of the distinct storages autograd keeps for backward over one micro-batch's forward, the parameters'
    own excluded (matmuls keep their weight: that is the model, not an activation)."""
    weights = {p.untyped_storage().data_ptr() for p in trainer.model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inputs, targets = trainer.data.train.next_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, aux = trainer.forward_loss(inputs, targets)
    (loss + aux).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return sum(kept.values())


COLUMNS = ("mode", "kept for backward", "vs none", "peak RSS growth in a step", "step time vs none")


def cells(row: dict, base: dict) -> tuple[str, ...]:
    return (row["mode"], f"{row['saved_bytes'] / 2**20:.1f} MiB", f"{row['saved_bytes'] / base['saved_bytes']:.2f}x",
            f"{row['peak_rss_growth'] / 2**20:.0f} MiB", f"{row['step_s'] / base['step_s']:.2f}x")


def report(rows: list[dict], args: argparse.Namespace) -> str:
    base = next(r for r in rows if r["mode"] == "none")
    table = [COLUMNS, ("---",) * len(COLUMNS), *(cells(r, base) for r in rows)]
    context = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, float32, one process; "
               f"model: {' '.join(MODEL)}; batch {args.batch} x seq {args.seq}")
    command = f"$ python bench/activation_memory.py --batch {args.batch} --seq {args.seq} --steps {args.steps}"
    return "\n".join([command, "", context, "", *("| " + " | ".join(r) + " |" for r in table)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq, args.steps)))
        return
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--batch", str(args.batch), "--seq",
                              str(args.seq), "--steps", str(args.steps)], capture_output=True, text=True, check=True,
                             env={**os.environ, **GLIBC_RETURNS_FREED_MEMORY})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    text = report(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
