"""Peak memory of building one rank's model: sharded construction (the Trainer's: meta device, cut to the rank's
part, only that allocated and initialised) against building the whole model and then sharding it (before), and
the whole model. A ~420 MB float32 MoE (d 512, 4 layers, 16 experts of width 1024), rank 1 of ep 4, on CPU; each
build in a fresh process, its peak resident memory above the process's state after the imports (Linux: the peak
is read from /proc/self/status).

    python bench/build_memory.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from activation_memory import proc_status_bytes  # bench/ is on sys.path: the scripts import each other by name

BUILDS = ("sharded", "full_then_shard", "full")


def build(mode: str) -> dict:
    from moe_train.config import Config, ModelConfig, MoEConfig
    from moe_train.config.parallel import ParallelConfig, ParallelDims
    from moe_train.models.transformer import build_model
    from moe_train.parallel.context import ParallelContext
    from moe_train.parallel.expert_parallel import CommCounter
    from moe_train.parallel.parallelize import parallelize

    model_cfg = ModelConfig(vocab_size=256, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1024)
    moe_cfg = MoEConfig(num_experts=16, top_k=2, d_ff=1024)
    ctx = ParallelContext(1, ParallelDims(4, 4, 1), None)  # no process group: cutting needs only the position

    def shard(model) -> None:
        parallelize(model, ctx, Config(parallel=ParallelConfig(dp=4, ep=4)), CommCounter())

    # Not ru_maxrss: Linux carries it across exec, so a child of a big process (pytest) would inherit its peak.
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    before = proc_status_bytes("VmRSS")
    if mode == "sharded":
        model = build_model(model_cfg, moe_cfg, seed=0, shard=shard)
    else:
        model = build_model(model_cfg, moe_cfg, seed=0)
        if mode == "full_then_shard":
            shard(model)
    peak = proc_status_bytes("VmHWM") - before
    return {"build": mode, "peak": peak, "held": sum(p.numel() * p.element_size() for p in model.parameters())}


def measure(mode: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--build", mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", choices=BUILDS, help=argparse.SUPPRESS)  # internal: one build in this process
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(args.build)))
        return
    print("| build | peak memory of the build | parameters held |\n|---|---|---|")
    for mode in BUILDS:
        r = measure(mode)
        print(f"| {mode} | {r['peak'] / 1e6:.0f} MB | {r['held'] / 1e6:.0f} MB |")


if __name__ == "__main__":
    main()
