"""Step time, all-to-all bytes and per-rank memory of the trainer at world 1, 2 and 4 on this machine (CPU, gloo).

Each layout trains the same model on the same global batch (same micro-batches: accumulation steps shrink with
dp) for `--steps` steps under torchrun; every rank reports its median step time (after `--warmup` steps), its peak
RSS, its parameter and optimizer-state bytes (expert and dense), and rank 0 the logged `a2a_bytes_per_step`.
Layouts run one after the other, `--rounds` times interleaved, so drift of the machine spreads over all of them;
the table gives medians over rounds and the step time relative to world 1 of the same round.

    python bench/parallel_scaling.py --out bench/results/parallel_scaling.md

On a 2-core CPU, world 4 oversubscribes the cores (torchrun gives each rank one thread): step times there measure
the overhead of the exchange, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL = ["model.d_model=256", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1024",
         "moe.num_experts=8", "moe.d_ff=512", "train.seq_len=256", "train.batch_size=16", "train.progress=false",
         "train.eval_every=0", "moe.capacity_factor=1.25", "moe.min_capacity=0", "data.embedded_size=1000000"]
LAYOUTS = {  # name: (world size, overrides)
    "world1": (1, []),
    "dp2": (2, []),
    "ep2": (2, ["parallel.ep=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "dp4_ep2": (4, ["parallel.ep=2"]),
    "dp4_ep4": (4, ["parallel.ep=4"]),
}
MICRO_BATCHES = 4  # per step over all dp ranks: micro-batch of 4 sequences


# -- inside torchrun ------------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from moe_train.cli_config import compose_config
    from moe_train.config import validate_config
    from moe_train.parallel.context import init_parallel, read_launch_env, shutdown
    from moe_train.parallel.data_parallel import split_expert_params
    from moe_train.training.trainer import Trainer

    env = read_launch_env()
    cfg = compose_config(json.loads(args.overrides))
    dims = validate_config(cfg, world_size=env.world_size)
    ctx = init_parallel(env, dims, torch.device("cpu"), 300.0)
    trainer = Trainer(cfg, pathlib.Path(args.run_dir), ctx, torch.device("cpu"))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.train_step(collect_stats=False)
        if ctx.groups is not None:
            dist.barrier()  # collective: the step ends when the slowest rank ends
        times.append(time.perf_counter() - start)
    dense, expert = split_expert_params(trainer.model)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = trainer.optimizer.state
    optim = lambda ps: nbytes(v for p in ps for v in state[p].values() if torch.is_tensor(v) and v.ndim)  # noqa
    report = {"step_s": statistics.median(times[args.warmup:]), "rss_mib": peak_rss_mib(),
              "dense_bytes": nbytes(dense), "expert_bytes": nbytes(expert), "dense_optim": optim(dense),
              "expert_optim": optim(expert), "a2a": trainer.comm.take() / args.steps}
    reports = [None] * env.world_size
    if ctx.groups is not None:
        dist.all_gather_object(reports, report)  # collective
    else:
        reports = [report]
    if env.rank == 0:
        pathlib.Path(args.result).write_text(json.dumps(reports))
    shutdown(ctx)


# -- orchestration --------------------------------------------------------------------------------------------------
def run_layout(name: str, args: argparse.Namespace, tmp: pathlib.Path) -> list[dict]:
    world, extra = LAYOUTS[name]
    dp = world // (2 if "parallel.tp=2" in extra else 1)
    overrides = MODEL + extra + [f"train.grad_accum_steps={MICRO_BATCHES // dp}"]
    result = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(29700 + world), __file__, "--rank-main", "--overrides", json.dumps(overrides), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--result", str(result), "--run-dir", str(tmp / name)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def summarise(name: str, rounds: list[list[dict]], base_times: list[float]) -> list[str]:
    world = len(rounds[0])
    step = statistics.median(r[0]["step_s"] for r in rounds)
    rel = statistics.median(r[0]["step_s"] / b for r, b in zip(rounds, base_times))
    first = rounds[0]
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    return [name, str(world), f"{step * 1000:.0f}", f"{rel:.2f}",
            f"{statistics.median(r['rss_mib'] for r in first):.0f}", mib(first[0]["expert_bytes"]),
            mib(first[0]["expert_optim"]), mib(first[0]["dense_bytes"]), mib(first[0]["dense_optim"]),
            f"{first[0]['a2a'] / 2**20:.1f}"]


COLUMNS = ["layout", "world", "step ms (median)", "step time vs world 1", "peak RSS MiB per rank (median)",
           "expert params MiB / rank", "expert optim MiB / rank", "dense params MiB / rank", "dense optim MiB / rank",
           "a2a MiB sent / step (rank 0)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--out")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_main:
        rank_main(args)
        return
    names = ["world1"] + [n for n in args.layouts.split(",") if n != "world1"]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                runs[name].append(run_layout(name, args, pathlib.Path(tmp)))
                print(f"{name}: {runs[name][-1][0]['step_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)
    base = [r[0]["step_s"] for r in runs["world1"]]
    rows = [summarise(n, runs[n], base) for n in names]
    header = (f"$ {shlex.join([sys.executable, *sys.argv])}\n\nCPU, {os.cpu_count()} cores, gloo; tiny model "
              f"(d 256, 4 layers, 8 experts top-2 of width 512, cf 1.25), global batch 16 x 256 tokens in "
              f"{MICRO_BATCHES} micro-batches; {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds\n")
    table = "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    print(header + "\n" + table)
    if args.out:
        pathlib.Path(args.out).write_text(header + "\n" + table + "\n")


if __name__ == "__main__":
    main()
