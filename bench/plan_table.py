"""docs/PARALLELISM.md's planner table: Mixtral-8x7B on 8, 16 and 64 GPUs of 80 GB, ep 8, seq 4096, bf16, one
sequence per GPU per micro-batch, under ZeRO 1/2/3 and FSDP2, with and without full activation checkpointing.
Each cell is one `moe-train-plan --json` process for that layout: predicted peak per rank, and whether it fits.

    python bench/plan_table.py --out bench/results/plan_table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

GIB = 2 ** 30

WORLDS = (8, 16, 64)
ENGINES = {"ZeRO 1": ["zero.stage=1"], "ZeRO 2": ["zero.stage=2"], "ZeRO 3": ["zero.stage=3"],
           "FSDP2": ["fsdp.enabled=true"]}
AC = {"no AC": "none", "full AC": "full"}
BASE = ["model=mixtral_8x7b", "parallel.ep=8", "train.seq_len=4096", "train.mixed_precision=bf16"]


def cell(world: int, engine: list[str], ac: str, gpu_mem: float) -> str:
    """One `moe-train-plan --json` per cell, each in its own process (as a user runs it)."""
    args = [*BASE, *engine, f"train.batch_size={world}", f"train.activation_checkpointing={ac}"]
    out = subprocess.run([sys.executable, "-m", "moe_train.planner.cli", *args, "--world", str(world), "--gpu-mem",
                          f"{gpu_mem:g}", "--json"], capture_output=True, text=True)
    if out.returncode:
        return f"error: {out.stderr.strip().splitlines()[-1]}"
    plan = json.loads(out.stdout)
    r = plan["per_rank"]
    verdict = "fits" if plan["fits"] else "**no**"
    return (f"{r['total_bytes'] / GIB:.0f} GiB {verdict} (P {r['param_bytes'] / GIB:.0f}, G "
            f"{r['grad_bytes'] / GIB:.0f}, O {r['optimizer_bytes'] / GIB:.0f}, A {r['activation_bytes'] / GIB:.0f})")


def table(gpu_mem: float) -> str:
    header = ["engine, checkpointing", *(f"{w} GPUs (dp {w}, edp {w // 8})" for w in WORLDS)]
    rows = [header, ["---"] * len(header)]
    for name, engine in ENGINES.items():
        for label, ac in AC.items():
            rows.append([f"{name}, {label}", *(cell(w, engine, ac, gpu_mem) for w in WORLDS)])
    command = f"$ python bench/plan_table.py --gpu-mem {gpu_mem:g}"
    context = (f"{' '.join(BASE)}, micro-batch 1 x 4096 per GPU, train.batch_size = GPUs; per rank: predicted peak "
               f"(parameters, gradients, optimizer, activations, GiB) of {gpu_mem:g} GiB, 2 GiB reserved")
    return "\n".join([command, "", context, "", *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-mem", type=float, default=80.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = table(args.gpu_mem)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
