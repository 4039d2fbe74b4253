"""`moe-train-plan [overrides] --world N [--gpu-mem GiB] [--json] [--dry-run]`: will a layout fit, before launch.

    moe-train-plan model=mixtral_8x7b parallel.ep=8 fsdp.enabled=true train.seq_len=4096 --world 64
    moe-train-plan model=mixtral_8x7b parallel.ep=8 zero.stage=2 --world 16 --gpu-mem 80 --json
    moe-train-plan model=mixtral_8x7b parallel.ep=8 parallel.tp=2 --world 64 --dry-run

Per rank: parameters, parameter / gradient / optimizer / activation bytes and the predicted peak (plan.py), the
all-to-all bytes each rank sends per optimizer step, training FLOPs per token, and whether the peak fits the device.
The config is validated exactly as `moe-train` validates it at launch (same messages). --dry-run also rehearses
every distinct rank role of the job on one CPU (dry_run.py). Nothing is allocated; nothing needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

import torch

from moe_train.cli_config import compose_config, exit_on_config_error
from moe_train.config.schema import validate_config
from moe_train.planner.plan import GIB, Plan, plan_layout

PROG = "moe-train-plan"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                     epilog="Other arguments are Hydra overrides, as for moe-train.")
    parser.add_argument("--world", type=int, required=True, help="ranks of the job (GPUs)")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one device, GiB (default 80)")
    parser.add_argument("--reserve", type=float, default=2.0,
                        help="GiB of the device kept for the CUDA context, NCCL and allocator slack (default 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="the device the job runs on (its optimizer: fused AdamW on CUDA; default cuda)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--dry-run", action="store_true",
                        help="also build and run every distinct rank role on fake tensors and a fake process group")
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        parser.error(f"unrecognized arguments: {' '.join(flags)}")
    if args.world < 1 or not args.gpu_mem > 0 or args.reserve < 0:
        parser.error(f"--world={args.world} must be >= 1, --gpu-mem={args.gpu_mem} > 0, --reserve={args.reserve} >= 0")
    return args, overrides


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(plan: Plan) -> str:
    r = plan.per_rank
    verdict = "fits" if plan.fits else "does NOT fit"
    return "\n".join([
        f"layout: {plan.layout}; {plan.world} ranks",
        f"parameters: {plan.params_total / 1e9:.3f}B total, {plan.params_active / 1e9:.3f}B active per token; "
        f"{r.params / 1e9:.3f}B stored per rank",
        f"per rank: parameters {gib(r.param_bytes)}, gradients {gib(r.grad_bytes)}, optimizer "
        f"{gib(r.optimizer_bytes)}, activations {gib(r.activation_bytes)}",
        f"predicted peak per rank: {gib(r.total_bytes)} of {gib(plan.gpu_mem_bytes)}: {verdict}",
        f"all-to-all sent per rank per step: {gib(plan.a2a_bytes_per_step)}; "
        f"training FLOPs per token: {plan.flops_per_token:.4g}"])


def main(argv: Optional[list[str]] = None) -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    with exit_on_config_error(PROG):
        cfg = compose_config(overrides)
        dims = validate_config(cfg, world_size=args.world)  # a real launch's checks and messages
    device = torch.device(args.device)
    with exit_on_config_error(PROG):  # shape errors found while cutting the model (e.g. FSDP2's expert rows)
        plan = plan_layout(cfg, dims, args.gpu_mem, args.reserve, device)
    report = None
    if args.dry_run:
        from moe_train.planner.dry_run import dry_run

        report = dry_run(cfg, dims, device)
    if args.json:
        print(json.dumps({**plan.to_json(), **({"dry_run": report.to_json()} if report else {})}))
        return
    print(describe(plan))
    if report is not None:
        print(report.describe())


if __name__ == "__main__":
    main()
