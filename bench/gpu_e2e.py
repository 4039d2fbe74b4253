"""Training throughput on one GPU, side by side in one process: our MoE LM and its dense twin through the real
`Trainer` (eager and torch.compile), and transformers' MixtralForCausalLM of the same shape.

Models (--models, comma-separated, run in this order):
    ours_eager, ours_compiled    our MoE through moe_train.training.trainer.Trainer (train.compile False/True)
    dense_eager, dense_compiled  the dense twin through the same Trainer: model.moe_every=0,
                                 model.d_ff = top_k * moe.d_ff (the same active parameters per token)
    hf_mixtral                   MixtralForCausalLM (sdpa attention, its default experts implementation: grouped_mm
                                 in transformers 5) in a plain loop written here (see HFStepper)

Shape (the "~1.2B" config, the default on CUDA): vocab 32000, d_model 1024, 16 layers, 16 heads / 8 kv heads,
8 SwiGLU experts of width 2816, top-2, dropless, routed_scale 1.0 (as HF), seq 2048, batch 8 (no accumulation);
dense twin d_ff 5632. On CPU the default is a toy shape (TOY_SHAPE) for smoke tests; --d-model etc. override either.

Training setup, the same for every model: bf16 autocast over float32 weights (train.mixed_precision=bf16), LM
cross-entropy in float32 + 0.01 x the load-balancing loss, gradient clipping at 1.0, torch AdamW with weight decay on
matrices only (fused on CUDA: optim.fused=true; foreach elsewhere), TF32 allowed for float32 matmuls on CUDA.
Data: every model reads the same batches, the default DataConfig (the embedded byte-level corpus, token ids < 256:
the compute does not depend on the ids, so this is fine with vocab 32000); HF gets them from its own `build_data`
with the same settings. No evaluation, no checkpoints, no logger, no progress bar.

Method. Trainer-driven models are timed by calling `Trainer.train_step(collect_stats=False)` directly, in our own loop,
rather than `Trainer.train()`: that is the exact step code of `train()` (next batch, forward, losses, backward, clip,
AdamW, schedule) minus its once-per-log host sync and bookkeeping, and it gives each step its own CUDA-synchronised
wall-clock time (a synchronize before and after every step; one synchronize costs microseconds next to a step of
~100 ms). --warmup untimed steps (they include torch.compile's compilation), then --steps timed ones.
tokens/s = batch x seq_len x timed steps / their summed time; step ms = median step time. Peak memory:
torch.cuda.max_memory_allocated from before the model is built to the end of its timed steps (weights, gradients,
AdamW state and activations), reset between models; everything is freed between models (del, gc, empty_cache,
torch._dynamo.reset()). A model that fails shows `error: ...` in its row; the others still run.

MFU (PaLM, appendix B): FLOPs/token = 6 N + 12 L d_model seq_len, where N = active parameters per token excluding
the input embedding table (the LM head counts: its matmul is real compute; with tied embeddings the table counts
once, as the head); the second term is attention's score and value matmuls (PaLM counts them without a causal
discount). MFU = tokens/s x FLOPs/token / the device's dense bf16 peak (H100/H200 SXM 989e12, A100 312e12 FLOP/s;
n/a on other devices and on CPU). At the default shape N = 360.1M and FLOPs/token = 2.563e9 (MoE, HF and dense
alike, within 0.1%), so 35% MFU on an H100 is ~135k tokens/s, ~121 ms per 16,384-token step.

Run on one GPU (about 4-6 minutes, much of it compiling and building the models; --quick 3-4):
    python bench/gpu_e2e.py --out bench/results/gpu_e2e.md --json bench/results/gpu_e2e.json
CPU smoke run (seconds):
    python bench/gpu_e2e.py --device cpu --quick --models ours_eager,dense_eager,hf_mixtral
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))  # bench scripts import each other by name
sys.path.insert(0, str(BENCH_DIR.parent))  # and moe_train without an installed package

from train_e2e import MixtralLM, mixtral_config, names_parser, param_counts  # noqa: E402

from moe_train.config.checkpoint import CheckpointConfig  # noqa: E402
from moe_train.config.data import DataConfig  # noqa: E402
from moe_train.config.logging import LoggingConfig  # noqa: E402
from moe_train.config.model import ModelConfig  # noqa: E402
from moe_train.config.moe import MoEConfig  # noqa: E402
from moe_train.config.optim import OptimConfig  # noqa: E402
from moe_train.config.schema import Config, validate_config  # noqa: E402
from moe_train.config.train import TrainConfig  # noqa: E402
from moe_train.data import build_data  # noqa: E402
from moe_train.models.params import flop_params  # noqa: E402
from moe_train.training.optim import build_scheduler, param_groups  # noqa: E402
from moe_train.training.trainer import Trainer, lm_loss  # noqa: E402

MODELS = ("ours_eager", "ours_compiled", "dense_eager", "dense_compiled", "hf_mixtral")
FULL_SHAPE = dict(vocab=32000, d_model=1024, layers=16, heads=16, kv_heads=8, experts=8, top_k=2, moe_d_ff=2816,
                  seq_len=2048, batch_size=8)
TOY_SHAPE = dict(vocab=512, d_model=64, layers=2, heads=4, kv_heads=2, experts=8, top_k=2, moe_d_ff=64,
                 seq_len=64, batch_size=2)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak, SXM parts
STEPS, WARMUP, QUICK_STEPS, QUICK_WARMUP = 20, 5, 5, 2
GIB = 2**30


class Target(NamedTuple):  # not a dataclass: tests load this script without registering it in sys.modules
    """`model`'s `metric`, divided by `ref`'s when given, must be >= bound (<= bound when at_most)."""

    text: str
    model: str
    metric: str
    bound: float
    ref: Optional[str] = None
    at_most: bool = False


TARGETS = (
    Target("ours_compiled tokens/s >= 0.85x dense_compiled", "ours_compiled", "tokens_per_s", 0.85, "dense_compiled"),
    Target("ours_compiled tokens/s >= 2.0x hf_mixtral", "ours_compiled", "tokens_per_s", 2.0, "hf_mixtral"),
    Target("ours_compiled MFU >= 35%", "ours_compiled", "mfu", 0.35),
    Target("ours_eager tokens/s >= 1.6x hf_mixtral", "ours_eager", "tokens_per_s", 1.6, "hf_mixtral"),
    Target("ours_eager peak memory <= 1.1x hf_mixtral's", "ours_eager", "peak_bytes", 1.1, "hf_mixtral", True),
)


# -- configuration ------------------------------------------------------------------------------------------------
def build_config(args: argparse.Namespace, name: str) -> Config:
    """Our Config for `name` (ours_* or dense_*; hf_mixtral reads its shape from ours_eager's), hydra-free."""
    dense = name.startswith("dense")
    model = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                        n_kv_heads=args.kv_heads, d_ff=args.top_k * args.moe_d_ff, moe_every=0 if dense else 1,
                        max_seq_len=args.seq_len)
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, d_ff=args.moe_d_ff, capacity_factor=-1.0,
                    eval_capacity_factor=-1.0, routed_scale=1.0)
    steps = args.warmup + args.steps
    train = TrainConfig(max_steps=steps, batch_size=args.batch_size, grad_accum_steps=1, seq_len=args.seq_len,
                        mixed_precision="bf16", device=args.device, log_every=steps, eval_every=0, eval_batches=1,
                        progress=False, compile=name.endswith("compiled"))
    optim = OptimConfig(fused="true" if args.device == "cuda" else "auto")
    cfg = Config(model=model, moe=moe, data=DataConfig(), optim=optim, train=train,
                 logger=LoggingConfig(backend="none"), checkpoint=CheckpointConfig(every=0, resume="none"))
    validate_config(cfg)
    return cfg


# -- one model's training step --------------------------------------------------------------------------------------
class TrainerStepper:
    """Our model (MoE or dense) in the real Trainer; `step` is Trainer.train_step itself."""

    def __init__(self, cfg: Config, device: torch.device, run_dir: Path):
        self.trainer = Trainer(cfg, run_dir, device=device)
        self.model = self.trainer.model

    def step(self) -> torch.Tensor:
        return self.trainer.train_step(collect_stats=False)[0]

    def flop_params(self) -> int:
        return flop_params(self.model)

    def close(self) -> None:
        self.trainer.metrics.close()


class HFStepper:
    """MixtralForCausalLM of the same shape in a plain loop doing what Trainer.train_step does: the same batches,
    bf16 autocast, our float32 LM loss on its logits + 0.01 x its load-balancing loss (MixtralLM, bench/train_e2e.py),
    gradient clipping, torch AdamW with our parameter groups (fused on CUDA) and LR schedule."""

    def __init__(self, cfg: Config, device: torch.device, run_dir: Path):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        with torch.device(device):  # initialised where it trains (1.2B parameters take long to init on the host)
            self.model = MixtralLM(hf_config(cfg)).to(device)
        self.data = build_data(cfg.data, cfg.train.seq_len, cfg.train.batch_size, val_batches=1)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                           eps=o.eps, fused=True if device.type == "cuda" else None)
        self.scheduler = build_scheduler(self.optimizer, o, cfg.train.max_steps)

    def step(self) -> torch.Tensor:
        inputs, targets = (t.to(self.device, non_blocking=True) for t in self.data.train.next_batch())
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits, aux_loss = self.model(inputs, return_aux=True)
        loss = lm_loss(logits, targets)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def flop_params(self) -> int:
        return param_counts(self.model)[1] - self.model.hf.get_input_embeddings().weight.numel()

    def close(self) -> None:
        pass


def hf_config(cfg: Config):
    """bench/train_e2e.py's equivalent MixtralConfig, with sdpa attention; experts keep HF's default."""
    config = mixtral_config(cfg)
    config._attn_implementation = "sdpa"
    return config


def hf_implementation(stepper) -> Optional[str]:
    return stepper.model.experts_implementation() if isinstance(stepper, HFStepper) else None


# -- measurement ------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int):
    """Seconds of each of `steps` steps after `warmup` untimed ones, and the last loss (read after the clock)."""
    for _ in range(warmup):
        step()
    seconds, loss = [], None
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds, loss.item()  # host sync, outside the timed region


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (0 = nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()  # first: compiled code and its guards hold references to the last model's tensors
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def flops_per_token(n_params: int, cfg: Config) -> float:
    """PaLM: 6 N + 12 L d_model seq_len (see the module docstring for N)."""
    m = cfg.model
    return 6 * n_params + 12 * m.n_layers * m.d_model * cfg.train.seq_len


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak FLOP/s of the device, from its name; None when unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Build `name`, train warmup + timed steps, return its figures (the stepper is freed on return)."""
    cfg = build_config(args, "ours_eager" if name == "hf_mixtral" else name)
    reset_peak(device)
    graphs = compiled_graphs()
    with tempfile.TemporaryDirectory() as run_dir:
        stepper = (HFStepper if name == "hf_mixtral" else TrainerStepper)(cfg, device, Path(run_dir))
        try:
            seconds, loss = time_steps(stepper.step, device, args.warmup, args.steps)
            n_params, impl = stepper.flop_params(), hf_implementation(stepper)
        finally:
            stepper.close()
    return summarize(seconds, cfg, n_params, device, loss=loss, peak_bytes=peak_bytes(device),
                     compiled_graphs=compiled_graphs() - graphs, hf_impl=impl)


def summarize(seconds: list[float], cfg: Config, n_params: int, device: torch.device, **extra) -> dict:
    tokens = cfg.train.batch_size * cfg.train.seq_len
    tokens_per_s = tokens * len(seconds) / max(sum(seconds), 1e-12)
    flops = flops_per_token(n_params, cfg)
    peak = peak_flops(device)
    return {"tokens_per_s": tokens_per_s, "step_ms": 1e3 * statistics.median(seconds),
            "step_seconds": seconds, "flop_params": n_params, "flops_per_token": flops,
            "mfu": tokens_per_s * flops / peak if peak else None, **extra}


def measure_safely(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """`measure`, with any failure (OOM included) recorded as the row's error; memory freed either way."""
    try:
        result = measure(name, args, device)
    except Exception as exc:  # one model's failure must not stop the others
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300].replace("|", "/")}
    free_memory(device)
    label = result.get("error") or f"{result['tokens_per_s']:,.0f} tokens/s"
    print(f"{name}: {label}", file=sys.stderr, flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------------------------
def ok(results: dict, name: str) -> Optional[dict]:
    r = results.get(name)
    return r if r is not None and "error" not in r else None


def ratio_cell(results: dict, name: str, ref: Optional[str]) -> str:
    r, d = ok(results, name), ok(results, ref) if ref else None
    return f"{r['tokens_per_s'] / d['tokens_per_s']:.2f}x" if r and d and name != ref else "-"


def dense_of(name: str) -> Optional[str]:
    return name.replace("ours", "dense") if name.startswith("ours") else None


def table_row(name: str, results: dict) -> str:
    r = results[name]
    if "error" in r:
        return f"| {name} | error: {r['error']} | | | | | |"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    peak = f"{r['peak_bytes'] / GIB:.1f}" if r["peak_bytes"] is not None else "n/a"
    cells = [name, f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}", mfu, peak,
             ratio_cell(results, name, "hf_mixtral"), ratio_cell(results, name, dense_of(name))]
    return "| " + " | ".join(cells) + " |"


def markdown_table(results: dict) -> str:
    lines = ["| model | tokens/s | step ms | MFU | peak GiB | vs HF | vs dense (same mode) |", "|---|" + "---:|" * 6]
    return "\n".join(lines + [table_row(name, results) for name in results])


def evaluate_target(target: Target, results: dict) -> str:
    r, ref = ok(results, target.model), ok(results, target.ref) if target.ref else None
    value = r and r[target.metric]
    if value is None or (target.ref and (ref is None or not ref[target.metric])):
        return f"n/a: {target.text} (needs {target.model}{' and ' + target.ref if target.ref else ''} with a value)"
    value = value / ref[target.metric] if ref else value
    met = value <= target.bound if target.at_most else value >= target.bound
    shown = f"{100 * value:.1f}%" if target.metric == "mfu" else f"{value:.2f}x"
    return f"{'met' if met else 'missed'}: {target.text} (measured {shown})"


def notes(results: dict) -> list[str]:
    """FLOPs per token and loss of each model, and any compiled row that compiled nothing."""
    lines = []
    for name, r in results.items():
        if "error" in r:
            continue
        extra = f"; HF: {r['hf_impl']}" if r.get("hf_impl") else ""
        if name.endswith("compiled") and not r["compiled_graphs"]:
            extra += "; WARNING: torch.compile produced no graph (train.compile not applied?)"
        lines.append(f"- {name}: N = {r['flop_params'] / 1e6:.1f}M, {r['flops_per_token'] / 1e9:.4g} GFLOP/token, "
                     f"last loss {r['loss']:.3f}{extra}")
    return lines


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def header(args: argparse.Namespace, argv: list[str], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    shape = (f"vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
             f"{args.experts} experts top-{args.top_k} of width {args.moe_d_ff} "
             f"(dense twin {args.top_k * args.moe_d_ff}), seq {args.seq_len}, batch {args.batch_size}; "
             f"{args.warmup} warm-up + {args.steps} timed steps")
    return (f"device: {name}; torch {torch.__version__}; transformers {transformers_version()}\n"
            f"command: {shlex.join(['python', 'bench/gpu_e2e.py', *argv])}\n{shape}\n")


def format_report(run: dict) -> str:
    results = run["results"]
    return "\n".join([run["header"], markdown_table(results), "",
                      "vs HF / vs dense: tokens/s ratios. MFU: PaLM FLOPs/token (6N + 12 L d S, N = active "
                      "non-embedding parameters + LM head) x tokens/s / bf16 peak.", *notes(results), "",
                      "Targets:", *[f"- {line}" for line in run["targets"]], ""])


# -- main -------------------------------------------------------------------------------------------------------------
parse_models = names_parser(MODELS)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=parse_models, default=list(MODELS), help=f"comma-separated: {','.join(MODELS)}")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_WARMUP} warm-up + {QUICK_STEPS} timed steps")
    p.add_argument("--steps", type=int, help=f"timed steps (default {STEPS}; --quick {QUICK_STEPS})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {WARMUP}; --quick {QUICK_WARMUP})")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    for key in FULL_SHAPE:
        p.add_argument(f"--{key.replace('_', '-')}", type=int,
                       help=f"default {FULL_SHAPE[key]} on CUDA, {TOY_SHAPE[key]} on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--json", help="write the raw figures here")
    return resolve_defaults(p.parse_args(argv))


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Unset shape flags take the full shape on CUDA, the toy one on CPU; unset step counts follow --quick."""
    shape = FULL_SHAPE if args.device == "cuda" else TOY_SHAPE
    for key, value in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else STEPS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else WARMUP
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    return args


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls, as the trainer's train.tf32=true
    results = {name: measure_safely(name, args, device) for name in args.models}
    return {"header": header(args, argv, device), "settings": vars(args), "results": results,
            "targets": [evaluate_target(t, results) for t in TARGETS]}


def write_outputs(args: argparse.Namespace, report: str, run: dict) -> None:
    for path, text in ((args.out, report), (args.json, json.dumps(run, indent=1, default=str))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_benchmark(args, argv)
    run["report"] = format_report(run)
    print(run["report"], flush=True)
    write_outputs(args, run["report"], run)
    return run


if __name__ == "__main__":
    main()
