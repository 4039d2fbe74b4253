"""torch.profiler table of one MoE layer's forward + backward: where the time goes (the H100 table in docs/GPU.md).

    python bench/profile_moe_layer.py --device cuda                       # D 1024, F 2816, 32k tokens, dropless
    python bench/profile_moe_layer.py --device cuda --capacity-factor 1.25

bf16 weights (router float32), input requiring grad, loss `out.float().sum() + aux`; 3 warm-up steps, then 3 profiled
steps; kernels sorted by device time (CPU time on CPU).
"""

from __future__ import annotations

import argparse

import torch

from moe_train.config import MoEConfig
from moe_train.models.moe import MoELayer


def build(args: argparse.Namespace) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff, capacity_factor=args.capacity_factor,
                    eval_capacity_factor=args.capacity_factor)
    layer = MoELayer(args.d_model, cfg).to(args.device, torch.bfloat16)
    layer.router.float()
    x = torch.randn(args.tokens, args.d_model, device=args.device, dtype=torch.bfloat16, requires_grad=True)
    return layer, x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2816)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=-1.0, help="-1 = dropless")
    args = p.parse_args()
    layer, x = build(args)

    def step() -> None:
        out, aux = layer(x)
        (out.float().sum() + aux).backward()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if args.device == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
