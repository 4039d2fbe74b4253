"""The memory planner (`moe-train-plan`) against measured peak memory, on CPU, for small layouts of 1, 2 and 4 ranks.

For each layout: the planner's per-rank prediction (device cpu: foreach AdamW's temporaries), then the real trainer
launched with torchrun; each rank measures its resident memory's peak growth from just before the Trainer is built
(model, gradients, optimizer state, activations, temporaries, DeepSpeed's buffers; the engines' code imported
before) to the end of the training steps
(the peak counter restarted through /proc/self/clear_refs: Linux only; glibc made to hand freed blocks back so that
resident memory follows the live tensors). Read the ratio column: predicted / measured of the most-loaded rank.

    python bench/plan_memory.py --out bench/results/plan_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GLIBC_RETURNS_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
# ~55M parameters (experts 50M), dropless: the tensors, not the interpreter, dominate each rank's memory.
MODEL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "moe.d_ff=1024",
         "moe.num_experts=8", "moe.top_k=2", "moe.capacity_factor=-1", "moe.eval_capacity_factor=-1"]
COMMON = ["train.progress=false", "train.eval_every=0", "train.log_every=1000", "train.seq_len=256",
          "data.embedded_size=400000", "checkpoint.every=0"]
LAYOUTS = {  # name: (world, overrides)
    "1 rank, local": (1, ["train.batch_size=8"]),
    "2 ranks, ep 2, FSDP2, AC full": (2, ["train.batch_size=16", "parallel.ep=2", "fsdp.enabled=true",
                                          "train.activation_checkpointing=full"]),
    "4 ranks, ep 2 x tp 2, AC selective": (4, ["train.batch_size=16", "parallel.ep=2", "parallel.tp=2",
                                               "train.activation_checkpointing=selective"]),
    "4 ranks, ep 2, ZeRO 2, 2 micro-batches": (4, ["train.batch_size=32", "train.grad_accum_steps=2",
                                                   "parallel.ep=2", "zero.stage=2",
                                                   "zero.reduce_bucket_size=5000000"]),
}


def proc_status_bytes(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def measure_rank(overrides: list[str], steps: int) -> None:
    """Under torchrun: this rank's peak resident-memory growth over building and training, one JSON line."""
    from moe_train.cli_config import compose_config
    from moe_train.config.schema import validate_config
    from moe_train.parallel.context import init_parallel, read_launch_env, shutdown
    from moe_train.training.trainer import Trainer

    torch.set_num_threads(1)
    cfg = compose_config(overrides)
    env = read_launch_env()
    dims = validate_config(cfg, env.world_size)
    ctx = init_parallel(env, dims, torch.device("cpu"), 300.0, "gloo")
    import_engines()  # host memory of imported code (deepspeed: ~100 MB) is not what the planner predicts
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
        before = proc_status_bytes("VmRSS")
        trainer = Trainer(cfg, Path(tmp), ctx, torch.device("cpu"))
        for _ in range(steps):
            trainer.train_step(collect_stats=False)
        peak = proc_status_bytes("VmHWM") - before
        print("MEASURED " + json.dumps({"rank": env.rank, "peak_bytes": peak}), flush=True)
        del trainer
    shutdown(ctx)


def import_engines() -> None:
    import moe_train.parallel.fsdp  # noqa: F401
    import moe_train.parallel.zero  # noqa: F401  (imports deepspeed)


def predict(world: int, overrides: list[str]) -> dict:
    from moe_train.cli_config import compose_config
    from moe_train.config.schema import validate_config
    from moe_train.planner.plan import plan_layout

    cfg = compose_config(overrides)
    return plan_layout(cfg, validate_config(cfg, world), 80.0, device=torch.device("cpu")).to_json()


def launch(world: int, overrides: list[str], steps: int) -> list[int]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
           "--measure", "--steps", str(steps), "--", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ,
                                                                             **GLIBC_RETURNS_FREED_MEMORY})
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rows = [json.loads(line.split("MEASURED ", 1)[1]) for line in out.stdout.splitlines() if "MEASURED " in line]
    return [r["peak_bytes"] for r in sorted(rows, key=lambda r: r["rank"])]


def run_layout(name: str, steps: int) -> dict:
    world, extra = LAYOUTS[name]
    overrides = [*MODEL, *COMMON, *extra]
    plan = predict(world, overrides)
    measured = launch(world, overrides, steps)
    return {"layout": name, "world": world, "predicted": plan["per_rank"]["total_bytes"], "measured": max(measured),
            "per_rank": plan["per_rank"]}


COLUMNS = ("layout", "predicted peak per rank", "measured (max over ranks)", "predicted / measured")


def report(rows: list[dict], steps: int) -> str:
    mib = 2 ** 20
    table = [COLUMNS, ("---",) * len(COLUMNS)]
    table += [(r["layout"], f"{r['predicted'] / mib:.0f} MiB", f"{r['measured'] / mib:.0f} MiB",
               f"{r['predicted'] / r['measured']:.3f}") for r in rows]
    context = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, float32, gloo; model: "
               f"{' '.join(MODEL)}; {' '.join(COMMON)}; {steps} training steps")
    return "\n".join([f"$ python bench/plan_memory.py --steps {steps}", "", context, "",
                      *("| " + " | ".join(r) + " |" for r in table)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layout", choices=list(LAYOUTS), action="append", help="default: all")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", action="store_true", help="one JSON line per layout instead of the table")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # internal: a torchrun rank
    args, overrides = parser.parse_known_args()
    if args.measure:
        measure_rank([o for o in overrides if o != "--"], args.steps)
        return
    rows = [run_layout(name, args.steps) for name in (args.layout or LAYOUTS)]
    text = "\n".join(json.dumps(r) for r in rows) if args.json else report(rows, args.steps)
    print(text)
    if args.out:
        args.out.write_text(text + ("\n" if args.json else ""))


if __name__ == "__main__":
    main()
