"""Memory traffic of a compiled train step, our MoE layer against the dense twin's FFN, from Inductor's own byte counts:
a floor on what the MoE costs over the dense model on any GPU, measured on a CPU.

    python bench/step_traffic.py --out bench/results/step_traffic.md      # the ~1.2B shape of bench/gpu_e2e.py
    python bench/step_traffic.py --dense-ms 99.2                          # and the bound on ours/dense it implies

Why. On the H100 (docs/BENCHMARKS.md, "One GPU") the compiled MoE trained at 0.71x the compiled dense twin's tokens/s
(target 0.85x). The two models do the same FLOPs per token; what the MoE adds is bytes: its FFN has E/K times the
dense FFN's parameters (each cast to bf16 every step, its gradient cast back, updated by AdamW, clipped), and its
tokens are gathered to their experts and combined back. Memory-bound kernels run one after another with the GEMMs on
one stream, so those bytes over the card's bandwidth are time the MoE step cannot avoid with this design.

How. One MoE layer (the accelerator path: grouped experts, scatter-free row gathers; dropless, and capacity with
--capacity-factor) and the dense SwiGLU FFN of width K x F are each compiled (torch.compile, Inductor, fullgraph)
forward + backward under bf16 autocast over float32 weights, at two token counts. After Inductor has fused the graph,
every scheduled kernel's read + write bytes are summed (what Inductor's own `count_bytes` metric sums), split into
GEMM kernels (mm, bmm, grouped mm with every dimension >= NARROW: compute-bound, their bytes hidden under their
FLOPs) and the rest (memory-bound: casts, elementwise, reductions, gathers, routing, the router's narrow GEMMs).
Bytes are linear in the token count T, so two compiles give bytes = fixed + per_token x T, extrapolated to
--tokens. The optimizer adds, per float32 parameter and step, fused AdamW's 28 bytes (read param, grad, exp_avg,
exp_avg_sq; write param, exp_avg, exp_avg_sq) and clipping's 12 (the norm reads each gradient, the scale reads and
writes it): OPTIMIZER_BYTES, CLIP_BYTES.

Floor of the extra step time = (memory-bound bytes of L MoE layers + their optimizer bytes - the same for the dense
FFNs) / --bandwidth (H100 SXM HBM3: 3.35e12 B/s). Attention, norms, embeddings and the LM head are the same in both
models and cancel. With --dense-ms (the dense twin's measured step), the best ours/dense tokens/s ratio the design
allows is dense_ms / (dense_ms + floor). What it leaves out, all of which only adds to the MoE's time: kernel launch
latency of the routing's small kernels, the grouped GEMM's efficiency against one large GEMM, achieved bandwidth below
peak.

Caveat: the counts come from Inductor's CPU backend. Its fusion of pointwise and reduction nodes follows the same
scheduler as the CUDA backend, but the kernels around extern ops can differ: on CPU, for example, each expert weight's
bf16 copy is written twice (once transposed for the forward grouped GEMM). The table shows bytes per parameter so
such differences are visible.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # moe_train without an installed package

from moe_train.config.moe import MoEConfig  # noqa: E402
from moe_train.models.moe.dispatch import LocalDispatcher  # noqa: E402
from moe_train.models.moe.layer import MoELayer  # noqa: E402
from moe_train.models.transformer import FeedForward  # noqa: E402
from moe_train.training.trainer import autocast_for  # noqa: E402

OPTIMIZER_BYTES = 28  # fused AdamW, float32 state: 4 reads + 3 writes of 4 bytes per parameter
CLIP_BYTES = 12  # clip_grad_norm: the norm reads each gradient (4), the scale reads and writes it (8)
GEMM_OPS = ("mm", "bmm", "addmm", "_grouped_mm", "baddbmm")
NARROW = 128  # a GEMM with a dimension below this is memory-bound on any GPU (the H100's ridge: ~300 FLOP/B)
H100_BANDWIDTH = 3.35e12  # B/s, H100 SXM HBM3 peak


@dataclass
class KernelBytes:
    """Read + write bytes of one compiled forward + backward, by kind of kernel."""

    gemm: int  # compute-bound GEMM kernels (their operands and outputs)
    memory: int  # every other kernel, narrow GEMMs included: memory-bound
    kernels: int  # scheduled kernels, GEMMs included
    gemms: int  # of which compute-bound GEMMs


@dataclass
class Fit:
    """bytes = fixed + per_token x T, from two compiles."""

    per_token: float
    fixed: float

    def at(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens


def gemm_dims(node) -> Optional[tuple[int, int, int]]:
    """(M, K, N) of an extern GEMM kernel node (mm, addmm, bmm, grouped mm: operands a [..., K] and b [..., N];
    M = a's other elements, batches included), else None."""
    if type(node).__name__ != "ExternKernelSchedulerNode":
        return None
    kernel = (getattr(node.node, "python_kernel_name", "") or "").removesuffix(".default")
    if not any(kernel.endswith(f".{op}") for op in GEMM_OPS):
        return None
    inputs = node.node.inputs  # addmm, baddbmm: (bias, a, b); grouped mm: (a, b, offsets)
    operands = inputs[1:3] if kernel.endswith(("addmm", "baddbmm")) else inputs[:2]
    a, b = (list(t.get_size()) for t in operands)
    k = int(a[-1])
    return int(math.prod(a)) // k, k, int(b[-1])


def is_compute_bound(node) -> bool:
    """A GEMM all of whose dimensions are >= NARROW: its bytes are hidden under its FLOPs on a GPU. A narrow one
    (the router's: N = E experts) does < NARROW FLOPs per byte and counts as memory-bound."""
    dims = gemm_dims(node)
    return dims is not None and min(dims) >= NARROW


@contextlib.contextmanager
def recording_kernels(out: list[KernelBytes]) -> Iterator[None]:
    """Append one KernelBytes per graph Inductor compiles inside the block (after fusion: the kernels it runs).
    Inductor's and AOTAutograd's caches are off, so every graph is compiled (a cache hit would skip codegen)."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.codegen

    def codegen(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        nodes = self.scheduler.nodes
        sizes = [(is_compute_bound(n), n.get_read_write_buffers_sizes()) for n in nodes]
        out.append(KernelBytes(sum(b for g, b in sizes if g), sum(b for g, b in sizes if not g), len(nodes),
                               sum(g for g, _ in sizes)))
        return result

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        GraphLowering.codegen = codegen
        try:
            yield
        finally:
            GraphLowering.codegen = original


def compiled_step_bytes(module: nn.Module, tokens: int, d_model: int) -> KernelBytes:
    """Compile `module` (fullgraph), run forward + backward on [tokens, d_model] float32 under bf16 autocast (as
    the Trainer does with train.mixed_precision=bf16 and train.compile=true), and sum the kernels' bytes."""
    torch._dynamo.reset()
    graphs: list[KernelBytes] = []
    x = torch.randn(tokens, d_model, requires_grad=True)
    with recording_kernels(graphs):
        compiled = torch.compile(module, fullgraph=True)
        with autocast_for(torch.device("cpu"), "bf16"):  # the Trainer's: its backward traced without autocast
            out = compiled(x)
        y, aux = out if isinstance(out, tuple) else (out, 0.0)
        (y.float().square().mean() + aux).backward()
    assert len(graphs) == 2, f"expected a forward and a backward graph, got {len(graphs)}"  # fullgraph: one each
    return KernelBytes(*(sum(getattr(g, f) for g in graphs) for f in ("gemm", "memory", "kernels", "gemms")))


def fit_bytes(measure: Callable[[int], KernelBytes], probe_tokens: tuple[int, int]) -> tuple[Fit, Fit, int]:
    """(memory-bound fit, GEMM fit, kernels) from compiles at the two token counts."""
    t1, t2 = probe_tokens
    a, b = measure(t1), measure(t2)
    if (a.kernels, a.gemms) != (b.kernels, b.gemms):
        raise ValueError(f"the compiles at --probe-tokens {t1} and {t2} differ ({a.kernels} vs {b.kernels} kernels, "
                         f"{a.gemms} vs {b.gemms} compute-bound GEMMs): a GEMM dimension crosses NARROW={NARROW} "
                         f"between them; use larger --probe-tokens")

    def fit(x1: float, x2: float) -> Fit:
        per_token = (x2 - x1) / (t2 - t1)
        return Fit(per_token, x1 - per_token * t1)

    return fit(a.memory, b.memory), fit(a.gemm, b.gemm), b.kernels


def build_moe(args: argparse.Namespace, capacity_factor: float) -> nn.Module:
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff, capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor, expert_impl="grouped")
    return MoELayer(args.d_model, cfg, LocalDispatcher(scatter_free=True))  # the accelerator path


def build_dense(args: argparse.Namespace) -> nn.Module:
    return FeedForward(args.d_model, args.top_k * args.d_ff)


@dataclass
class Row:
    name: str
    params: int  # parameters of one layer
    per_token: float  # memory-bound bytes per token, forward + backward
    fixed: float  # memory-bound bytes independent of T (weight casts, gradient casts)
    gemm_per_token: float
    kernels: int  # scheduled kernels, forward + backward

    def step_bytes(self, tokens: int, layers: int) -> float:
        """Memory-bound bytes of `layers` such layers in one step, the optimizer and clipping included."""
        return layers * (self.fixed + self.per_token * tokens + self.params * (OPTIMIZER_BYTES + CLIP_BYTES))


def measure_row(name: str, module: nn.Module, args: argparse.Namespace) -> Row:
    memory, gemm, kernels = fit_bytes(lambda t: compiled_step_bytes(module, t, args.d_model), args.probe_tokens)
    params = sum(p.numel() for p in module.parameters())
    return Row(name, params, memory.per_token, memory.fixed, gemm.per_token, kernels)


def measure(args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    rows = [measure_row("dense FFN", build_dense(args), args),
            measure_row("MoE, dropless", build_moe(args, -1.0), args)]
    if args.capacity_factor > 0:
        rows.append(measure_row(f"MoE, capacity {args.capacity_factor:g}", build_moe(args, args.capacity_factor), args))
    return rows


def floor_ms(extra_bytes: float, bandwidth: float) -> float:
    return extra_bytes / bandwidth * 1e3


def report(rows: list[Row], args: argparse.Namespace) -> str:
    dense = rows[0]
    lines = [f"Memory-bound bytes of one FFN layer, forward + backward, compiled, bf16 autocast (Inductor's counts, "
             f"CPU backend); per step: {args.layers} layers x {args.tokens:,} tokens, + AdamW and clipping "
             f"({OPTIMIZER_BYTES + CLIP_BYTES} B per parameter); floor at {args.bandwidth / 1e12:.2f} TB/s.", "",
             "| layer | params | kernels | KB per token | fixed MB (B per param) | GB per step | vs dense GB | "
             "floor ms vs dense |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        step = r.step_bytes(args.tokens, args.layers)
        extra = step - dense.step_bytes(args.tokens, args.layers)
        lines.append(f"| {r.name} | {r.params / 1e6:.1f}M | {r.kernels} | {r.per_token / 1e3:.1f} | "
                     f"{r.fixed / 1e6:.0f} ({r.fixed / r.params:.1f}) | {step / 1e9:.1f} | {extra / 1e9:+.1f} | "
                     f"{floor_ms(extra, args.bandwidth):+.1f} |")
    lines += ["", *breakdown(rows, args)]
    return "\n".join(lines + bound_lines(rows, args)) + "\n"


def breakdown(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Where each MoE row's extra floor comes from: parameters (fixed + optimizer) against tokens."""
    dense, out = rows[0], []
    for r in rows[1:]:
        params = args.layers * (r.fixed + r.params * (OPTIMIZER_BYTES + CLIP_BYTES)
                                - dense.fixed - dense.params * (OPTIMIZER_BYTES + CLIP_BYTES))
        tokens = args.layers * (r.per_token - dense.per_token) * args.tokens
        out.append(f"{r.name}: {floor_ms(params, args.bandwidth):.1f} ms from the extra parameters (weight and "
                   f"gradient casts, AdamW, clipping), {floor_ms(tokens, args.bandwidth):.1f} ms from the tokens "
                   f"(routing, dispatch, combine: {(r.per_token - dense.per_token) / 1e3:.1f} KB per token per layer)")
    return out


def bound_lines(rows: list[Row], args: argparse.Namespace) -> list[str]:
    if args.dense_ms is None:
        return []
    dense, out = rows[0], ["", f"With the dense twin's step at {args.dense_ms:g} ms:"]
    for r in rows[1:]:
        extra = floor_ms(r.step_bytes(args.tokens, args.layers) - dense.step_bytes(args.tokens, args.layers),
                         args.bandwidth)
        out.append(f"- {r.name}: step >= {args.dense_ms + extra:.1f} ms, tokens/s <= "
                   f"{args.dense_ms / (args.dense_ms + extra):.3f}x the dense twin's")
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2816, help="expert width F (the dense FFN is top_k x F wide)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25, help="also measure capacity mode; <= 0: skip")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (seq 2048 x batch 8)")
    p.add_argument("--probe-tokens", type=int, nargs=2, default=(1024, 2048), help="the two compiled token counts")
    p.add_argument("--bandwidth", type=float, default=H100_BANDWIDTH, help="device memory bandwidth, B/s")
    p.add_argument("--dense-ms", type=float, help="measured dense-twin step time: print the bound it implies")
    p.add_argument("--out", help="also write the markdown to this file")
    p.add_argument("--json", help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.probe_tokens[0] == args.probe_tokens[1] or min(args.probe_tokens) < 1:
        p.error(f"--probe-tokens must be two different positive counts, got {args.probe_tokens}")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    try:
        rows = measure(args)
    except ValueError as exc:
        raise SystemExit(f"step_traffic: {exc}") from None
    text = report(rows, args)
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"    python bench/step_traffic.py {' '.join(argv or sys.argv[1:])}\n\n{text}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
