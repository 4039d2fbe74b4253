"""Forward+backward time and peak memory of one MoE layer against a dense FFN and other MoE implementations.

Shapes: D=512 model width, F=1024 expert width (--d-model, --d-ff), E=8 experts; dense reference = SwiGLU FFN of
width k*F=2048 (the active FLOPs of top-2). Compared: our `MoELayer` (capacity top-2/top-1, dropless top-2 with the
default expert implementation and with torch's grouped GEMM), DeepSpeed's `deepspeed.moe.layer.MoE` (top-2, capacity
1.25) and transformers' `MixtralSparseMoeBlock` with each experts implementation that runs on CPU (eager, grouped_mm,
batched_mm). `hf_mixtral_eager` is also what a standalone block runs when no implementation is set (config value
None); a full transformers model defaults to grouped_mm.

Method: every (tokens, dtype, case) runs in a fresh subprocess (this script re-invoked with `--case JSON`, printing
one JSON line). A step is forward, `(out.float().sum() + aux).backward()` with the input requiring grad, then every
`.grad` set to None. Time of one run: median of `--repeats` steps after `--warmup` steps (time.perf_counter,
synchronised on CUDA). Each (tokens, dtype) group is run `--rounds` times, dense first in each round; the time ratio
is the median over rounds of case / dense of the same round, so drift of a shared machine cancels within a pair.
With --compile every case's forward (dense included) is wrapped in torch.compile, compiled during the warm-up.
Peak memory, on one more identical step: CUDA `max_memory_allocated` minus the allocated bytes before it; CPU the
peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) minus the RSS before it. On CPU the
child's address space is capped a little below MemAvailable, so an oversized case fails with an allocation error
(shown as `error: ...` in its row) instead of waking the OOM killer. Memory: median over rounds. torch's default thread count is left alone.

Run: `make bench` (= `python bench/moe_layer.py`), or e.g.
    python bench/moe_layer.py --tokens 1024 --dtypes bfloat16 --cases ours_cap_top2,deepspeed_top2 --repeats 5
At Mixtral-8x7B's layer shape on a GPU:
    python bench/moe_layer.py --device cuda --dtypes bfloat16 --d-model 4096 --d-ff 14336 --tokens 8192 \
        --cases ours_dropless_top2,ours_cap_top2,hf_mixtral_grouped_mm
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import json
import os
import re
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 512, 1024, 8, 2
INIT_STD = 0.02
MEMORY_HEADROOM = 0.9  # CPU: cap new address space at this fraction of MemAvailable
DEFAULT_TOKENS = "1024,4096,16384,32768"
DEFAULT_DTYPES = "float32,bfloat16"
COLUMNS = ("tokens", "dtype", "case", "median ms", "ms / 1k tok", "time vs dense", "peak MiB", "mem vs dense")


@dataclass
class Bench:
    """A built case: `forward(x) -> (out, aux or None)`; `module` owns every parameter; `close` frees resources."""

    module: nn.Module
    forward: Callable[[torch.Tensor], tuple]
    x: torch.Tensor
    close: Callable[[], None] = field(default=lambda: None)


# -- case builders ------------------------------------------------------------------------------------------------
def _prepare(module: nn.Module, x_shape: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    """Same init for every case (N(0, 0.02), seeded), then cast params and input to dtype; train mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, INIT_STD)
    module.to(device=device, dtype=dtype).train()
    x = torch.randn(x_shape, device=device).to(dtype).requires_grad_(True)
    return module, x


class DenseFFN(nn.Module):
    """Dense SwiGLU FFN of width k*F: the active FLOPs of one top-k token."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(d_hidden, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moe_train.models.moe.activations import expert_mlp
        return expert_mlp(x, self.w1, self.w2, self.w3, "swiglu")


def build_dense(tokens: int, dtype: torch.dtype, device: torch.device, d_model: int = D_MODEL,
                d_ff: int = D_FF) -> Bench:
    module, x = _prepare(DenseFFN(d_model, TOP_K * d_ff), (tokens, d_model), dtype, device)
    return Bench(module, lambda inp: (module(inp), None), x)


def _grouped_impl_name() -> str:
    from moe_train.config.moe import EXPERT_IMPLS
    return "grouped_mm" if "grouped_mm" in EXPERT_IMPLS else "grouped"


def ours(top_k: int, capacity_factor: float, expert_impl: str = "auto", renormalize: bool = True) -> Callable:
    """Builder of our MoELayer; capacity_factor -1 = dropless (train and eval)."""

    def build(tokens: int, dtype: torch.dtype, device: torch.device, d_model: int = D_MODEL,
              d_ff: int = D_FF) -> Bench:
        from moe_train.config.moe import MoEConfig
        from moe_train.models.moe import MoELayer
        impl = _grouped_impl_name() if expert_impl == "grouped" else expert_impl
        eval_cf = capacity_factor if capacity_factor < 0 else MoEConfig.eval_capacity_factor
        cfg = MoEConfig(num_experts=NUM_EXPERTS, top_k=top_k, d_ff=d_ff, activation="swiglu",
                        capacity_factor=capacity_factor, eval_capacity_factor=eval_cf, min_capacity=4,
                        renormalize=renormalize, expert_impl=impl)
        module, x = _prepare(MoELayer(d_model, cfg), (tokens, d_model), dtype, device)
        return Bench(module, module, x)

    return build


class SwiGLUExpert(nn.Module):
    """One DeepSpeed expert: w2(silu(w1 x) * w3 x), bias-free (Mixtral's expert)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_deepspeed_dist() -> None:
    """Single-process gloo group, then deepspeed.comm on top of it (needed by set_deepspeed_parallelism)."""
    import deepspeed
    import deepspeed.ops
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 26 s JIT build of the shm op
    deepspeed.init_distributed(dist_backend="gloo")


def build_deepspeed(tokens: int, dtype: torch.dtype, device: torch.device, d_model: int = D_MODEL,
                    d_ff: int = D_FF) -> Bench:
    from deepspeed.moe.layer import MoE
    _init_deepspeed_dist()
    moe = MoE(hidden_size=d_model, expert=SwiGLUExpert(d_model, d_ff), num_experts=NUM_EXPERTS, ep_size=1,
              k=TOP_K, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4, use_residual=False,
              noisy_gate_policy=None, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()  # what the DeepSpeed engine does: creates/assigns the ep_size_1 group
    module, x = _prepare(moe, (tokens, d_model), dtype, device)
    return Bench(module, lambda inp: module(inp)[:2], x, torch.distributed.destroy_process_group)


def hf_mixtral(experts_implementation: str) -> Callable:
    """Builder of transformers' MixtralSparseMoeBlock with the given experts implementation (input [1, T, D])."""

    def build(tokens: int, dtype: torch.dtype, device: torch.device, d_model: int = D_MODEL,
              d_ff: int = D_FF) -> Bench:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        config = MixtralConfig(hidden_size=d_model, intermediate_size=d_ff, num_local_experts=NUM_EXPERTS,
                               num_experts_per_tok=TOP_K, experts_implementation=experts_implementation)
        module, x = _prepare(MixtralSparseMoeBlock(config), (1, tokens, d_model), dtype, device)
        return Bench(module, lambda inp: (module(inp), None), x)  # returns only the hidden states

    return build


# Builders: (tokens, dtype, device, d_model, d_ff) -> Bench.
CASES: dict[str, Callable[..., Bench]] = {
    "dense": build_dense,
    "ours_cap_top2": ours(top_k=2, capacity_factor=1.25),
    "ours_dropless_top2": ours(top_k=2, capacity_factor=-1.0),
    "ours_dropless_top2_gmm": ours(top_k=2, capacity_factor=-1.0, expert_impl="grouped"),
    "ours_cap_top1": ours(top_k=1, capacity_factor=1.25, renormalize=False),
    "deepspeed_top2": build_deepspeed,
    "hf_mixtral_grouped_mm": hf_mixtral("grouped_mm"),
    "hf_mixtral_batched_mm": hf_mixtral("batched_mm"),
    "hf_mixtral_eager": hf_mixtral("eager"),
}
# batched_mm gathers a copy of the expert weights for every token-expert pair (16 GiB and 37 s per step at 1k tokens
# in float32, an allocation error from 4k up): measured once at 1k, left out of the default matrix.
DEFAULT_CASES = [name for name in CASES if name != "hf_mixtral_batched_mm"]


# -- measurement (child process) ----------------------------------------------------------------------------------
def fwd_bwd(bench: Bench) -> None:
    out, aux = bench.forward(bench.x)
    loss = out.float().sum()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    bench.x.grad = None
    for p in bench.module.parameters():
        p.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall-clock ms of each of `repeats` steps, after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _proc_kib(key: str, path: str = "/proc/self/status") -> int:
    with open(path) as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS, so reusing them during the step shows up in the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak memory of one step above what was live before it (CUDA allocator, or RSS high-water mark on CPU)."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _proc_kib("VmRSS")
    step()
    return (_proc_kib("VmHWM") - base) * 1024


def limit_cpu_memory(device: torch.device) -> None:
    """CPU only: cap the address space so an oversized case raises an allocation error instead of an OOM kill."""
    if device.type != "cpu":
        return
    budget = _proc_kib("VmSize") + int(MEMORY_HEADROOM * _proc_kib("MemAvailable", "/proc/meminfo"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (budget * 1024, hard))


def run_case(spec: dict) -> dict:
    torch.manual_seed(0)
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    shape = spec.get("d_model", D_MODEL), spec.get("d_ff", D_FF)
    bench = CASES[spec["case"]](spec["tokens"], dtype, device, *shape)
    if spec.get("compile"):
        bench.forward = torch.compile(bench.forward)  # compiled on the first warm-up step (warmup >= 1)
    try:
        limit_cpu_memory(device)
        step = functools.partial(fwd_bwd, bench)
        times = time_steps(step, device, spec["warmup"], spec["repeats"])
        peak = peak_bytes(step, device)
    finally:
        bench.close()
    return {"median_ms": statistics.median(times), "times_ms": times, "peak_bytes": peak}


def child_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = run_case(spec)
    except Exception as exc:  # reported in the table row, never fatal to the run
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
    print(json.dumps({**spec, **result}), flush=True)


# -- orchestration (parent process) -------------------------------------------------------------------------------
def _last_json_line(text: str) -> Optional[dict]:
    for line in reversed(text.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "case" in obj:
            return obj
    return None


def run_in_subprocess(spec: dict, timeout_s: float) -> dict:
    """Run one case in a fresh interpreter; any failure becomes {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    result = _last_json_line(proc.stdout)
    if result is not None:
        return result
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return {**spec, "error": f"child exited with code {proc.returncode}: {tail}"}


def _ratio(value: Optional[float], ref: Optional[float]) -> str:
    return f"{value / ref:.2f}" if value is not None and ref else "-"


def format_row(res: dict, dense: dict) -> list[str]:
    head = [str(res["tokens"]), res["dtype"], res["case"]]
    if "error" in res:
        return head + [f"error: {res['error']}"] + [""] * (len(COLUMNS) - 4)
    ms, mib = res["median_ms"], res["peak_bytes"] / 2**20
    dense_mib = dense["peak_bytes"] / 2**20 if "peak_bytes" in dense else None
    return head + [f"{ms:.2f}", f"{ms * 1024 / res['tokens']:.3f}", _ratio(res.get("time_ratio"), 1.0),
                   f"{mib:.1f}", _ratio(mib, dense_mib)]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def paired_summary(results: list[dict], dense_results: list[dict]) -> dict:
    """Merge one case's rounds: median time over rounds, and the ratio to dense as the median of per-round ratios
    (case and dense of a round ran back to back, so slow drift of this shared machine cancels in each pair)."""
    ok = [(r, d) for r, d in zip(results, dense_results) if "error" not in r and "error" not in d]
    if not ok:
        return next((r for r in results if "error" in r), results[0])
    merged = dict(ok[0][0])
    merged["median_ms"] = statistics.median(r["median_ms"] for r, _ in ok)
    merged["peak_bytes"] = statistics.median(r["peak_bytes"] for r, _ in ok)
    merged["time_ratio"] = statistics.median(r["median_ms"] / d["median_ms"] for r, d in ok)
    return merged


def run_group(args: argparse.Namespace, tokens: int, dtype: str, cases: list[str]) -> dict[str, list[dict]]:
    """`args.rounds` rounds; each runs dense, then every other case, each in a fresh subprocess."""
    results: dict[str, list[dict]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            spec = {"case": case, "tokens": tokens, "dtype": dtype, "device": args.device,
                    "repeats": args.repeats, "warmup": args.warmup, "d_model": args.d_model, "d_ff": args.d_ff,
                    "compile": args.compile}
            results[case].append(run_in_subprocess(spec, args.timeout))
            res = results[case][-1]
            print(f"{tokens} {dtype} {case}: {res.get('median_ms', res.get('error'))}", file=sys.stderr, flush=True)
    return results


def run_matrix(args: argparse.Namespace) -> list[list[str]]:
    """Every (tokens, dtype) group runs `dense` first in each round, the reference of its ratios."""
    cases = ["dense"] + [c for c in args.cases if c != "dense"]
    rows = []
    for tokens in args.tokens:
        for dtype in args.dtypes:
            results = run_group(args, tokens, dtype, cases)
            dense = paired_summary(results["dense"], results["dense"])
            rows += [format_row(paired_summary(results[c], results["dense"]), dense) for c in cases]
    return rows


def _csv(kind: Callable, allowed: Optional[tuple] = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; allowed: {', '.join(allowed)}")
        return values

    return parse


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=_csv(int), default=_csv(int)(DEFAULT_TOKENS))
    p.add_argument("--dtypes", type=_csv(str, ("float32", "bfloat16")), default=_csv(str)(DEFAULT_DTYPES))
    p.add_argument("--cases", type=_csv(str, tuple(CASES)), default=DEFAULT_CASES)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--rounds", type=int, default=3, help="fresh-subprocess runs of every case (paired with dense)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--d-model", type=int, default=D_MODEL, help="model width D (dense and every MoE case)")
    p.add_argument("--d-ff", type=int, default=D_FF, help=f"expert width F (the dense FFN is {TOP_K} x F wide)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every case's forward, dense included (as train.compile=true does per block)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per case before it counts as an error")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON spec) in this process
    args = p.parse_args(argv)
    if args.compile and args.warmup < 1:
        p.error(f"--compile needs --warmup >= 1 (the first step compiles), got --warmup {args.warmup}")
    return args


def header(args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    compiled = "; every case torch.compile-d" if args.compile else ""
    return (f"$ {shlex.join([sys.executable, *sys.argv])}\n\n"
            f"device: {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; D={args.d_model} "
            f"F={args.d_ff} E={NUM_EXPERTS}{compiled}; per run the median of {args.repeats} steps after "
            f"{args.warmup} warm-up; {args.rounds} rounds; time ratio = median over rounds of (case / dense of the "
            f"same round)\n")


def main() -> None:
    args = parse_args()
    if args.case:
        child_main(args.case)
        return
    print(header(args), flush=True)
    table = markdown_table(run_matrix(args))
    print(table, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(header(args) + "\n" + table + "\n")


if __name__ == "__main__":
    main()
