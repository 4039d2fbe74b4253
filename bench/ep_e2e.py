"""End-to-end training at world 2, expert parallelism 2, ZeRO stage 2: our MoE against deepspeed.moe.layer.MoE.

Setup: the configuration of bench/train_e2e.py (tinyshakespeare as bytes, first 90% trains, last 10% validates;
seq 256, global batch 16, float32; AdamW lr 3e-3, 30 warm-up steps, cosine to 3e-4 at the last step (300), weight
decay 0.1 on matrices, beta2 0.95, gradient clipping 1.0; d 256, 4 layers, 8 heads / 4 kv heads, byte vocabulary,
8 SwiGLU experts of width 512, top-2, aux loss 0.01) launched with torchrun on 2 ranks (gloo): parallel.ep=2, so each
rank holds 4 of the 8 experts of every layer and tokens travel by all-to-all, and zero.stage=2 (optimizer state and
gradients partitioned). Per rank micro-batch 8 x 1 accumulation step (--grad-accum 2: 4 x 2).
Both models route in capacity mode, the one DeepSpeed's MoE has: capacity factor 1.25 in training and in
evaluation, min_capacity 4, first choices before second choices, aux loss counting first choices (GShard), no
second-expert sampling (ours `second_expert_policy=all`, DeepSpeed `top2_2nd_expert_sampling=False`), no noise,
no random token selection (`use_rts=False`). tests/test_moe_vs_deepspeed.py shows the two layers then compute the
same outputs, aux loss and gradients.

Models, the same transformer around two MoE layers:
  * ours: `Trainer` with parallel.ep=2 zero.stage=2 (moe_train/parallel/zero.py: our AllToAllDispatcher moves the
    tokens, DeepSpeed's engine reduces, partitions and steps);
  * DeepSpeed: the same `Transformer` (same seed: same initial weights) whose MoE layers are replaced by
    `deepspeed.moe.layer.MoE(ep_size=2, k=2, ...)` with `FeedForward` (our SwiGLU) experts, router weight and this
    rank's 4 experts copied from ours (DeepSpeed's all-to-all sends chunk r of its [E, C, D] buffer to ep rank r,
    so ep rank r holds global experts 4r..4r+3, as ours), trained by `deepspeed.initialize` with the same ZeRO-2
    config, a torch AdamW client optimizer over DeepSpeed's dense/expert groups
    (`split_params_into_different_moe_groups_for_optimizer`) and the same LR schedule.
Both train through the very same `Trainer.train_step` (next batch, forward, LM cross-entropy + aux loss, engine
backward and step).

Method. Each rank builds both trainers (same seed: same loader order and initial weights) and runs them in lockstep:
at step i both take step i on the same batches, the order alternating every step. A barrier closes every timed step
(the step ends when the slower rank ends); tokens/s = global tokens (16 x 256 per step) / summed step time. Before
any update both models hold the same weights and see the same batch, so their step-1 losses must agree (a check of
the copy). Validation: mean LM loss over the same fixed 320 sequences (split over the ranks, averaged over both)
every --eval-every steps and at the end. Peak RSS: both models share each rank's process, so each model also trains
--rss-steps steps alone in a fresh torchrun launch (VmHWM per rank).

Run (about an hour on 2 CPU cores):
    python bench/ep_e2e.py --out bench/results/ep_e2e.md --json bench/results/ep_e2e.json
Quick check (about 2 minutes): python bench/ep_e2e.py --steps 6 --eval-every 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_e2e (it adds the repository root itself)

from train_e2e import (DEFAULT_DATA, REPO_ROOT, Contender, base_config, check_batches_agree,  # noqa: E402
                       device_description, fmt_ratio, paired_step_ratio, proc_status_mib, train_lockstep, val_table)
from moe_train.config.moe import MoEConfig  # noqa: E402
from moe_train.config.parallel import ParallelConfig  # noqa: E402
from moe_train.config.schema import Config, validate_config  # noqa: E402
from moe_train.config.zero import ZeroConfig  # noqa: E402
from moe_train.models.moe.layer import MoELayer  # noqa: E402
from moe_train.models.transformer import FeedForward, build_model  # noqa: E402
from moe_train.parallel.context import ParallelContext, init_parallel, read_launch_env, shutdown  # noqa: E402
from moe_train.parallel.zero import (ZeroEngine, create_expert_groups, deepspeed_config,  # noqa: E402
                                     init_deepspeed_comm, optimizer_groups)
from moe_train.training.optim import build_scheduler  # noqa: E402
from moe_train.training.trainer import Trainer  # noqa: E402

MODELS = ("ours", "deepspeed")
LABELS = {"ours": "moe_train MoE", "deepspeed": "deepspeed.moe.layer.MoE"}
WORLD, EP, ZERO_STAGE = 2, 2, 2
CAPACITY_FACTOR, MIN_CAPACITY = 1.25, 4
SPEEDUP_TARGET = 1.2  # ours must reach this multiple of DeepSpeed's tokens/s


# -- configuration ------------------------------------------------------------------------------------------------
def ep_config(args: argparse.Namespace) -> Config:
    """train_e2e's configuration at ep 2 / ZeRO 2, routed in DeepSpeed's capacity mode (see the module docstring).
    Validation: --val-batches batches of --batch-size sequences = that many x batch/micro micro-batches."""
    base = base_config(argparse.Namespace(**{**vars(args), "moe": "", "device": "cpu"}))
    moe = dataclasses.replace(base.moe, capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR,
                              min_capacity=MIN_CAPACITY, drop_policy="position", second_expert_policy="all",
                              aux_loss_counting="first", aux_loss_coef=0.01, z_loss_coef=0.0, router="topk",
                              jitter_eps=0.0, renormalize=True, activation="swiglu",
                              routed_scale=1.0)  # DeepSpeed adds the gate-weighted expert sum unscaled
    micro = args.batch_size // (args.grad_accum * WORLD)
    train = dataclasses.replace(base.train, grad_accum_steps=args.grad_accum,
                                eval_batches=args.val_batches * args.batch_size // micro)
    cfg = dataclasses.replace(base, moe=moe, train=train, parallel=ParallelConfig(ep=EP, backend="gloo"),
                              zero=ZeroConfig(stage=ZERO_STAGE))
    validate_config(cfg, world_size=WORLD)
    return cfg


# -- DeepSpeed's MoE in our transformer -----------------------------------------------------------------------------
class DeepSpeedMoEFFN(nn.Module):
    """deepspeed.moe.layer.MoE behind our MoE layer's contract: forward(x) -> (out, aux_loss_coef * l_aux).
    DeepSpeed's top-2 l_aux = E * sum_e mean_t(p_te) * f_e with f_e the first-choice fractions: ours with
    aux_loss_counting=first."""

    def __init__(self, d_model: int, cfg: MoEConfig, ep: int):
        super().__init__()
        self.aux_loss_coef = cfg.aux_loss_coef
        self.moe = MoE(hidden_size=d_model, expert=FeedForward(d_model, cfg.d_ff), num_experts=cfg.num_experts,
                       ep_size=ep, k=cfg.top_k, capacity_factor=cfg.capacity_factor,
                       eval_capacity_factor=cfg.eval_capacity_factor, min_capacity=cfg.min_capacity,
                       noisy_gate_policy=None, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)

    @torch.no_grad()
    def copy_from(self, ours: MoELayer, ep_rank: int) -> None:
        """Router weight, and the global experts ep_rank * L .. (ep_rank + 1) * L - 1 this ep rank holds."""
        self.moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        local = self.moe.deepspeed_moe.experts.deepspeed_experts
        first = ep_rank * len(local)
        for i, expert in enumerate(local):
            for name in ("w1", "w2", "w3"):
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[first + i])

    def forward(self, x: torch.Tensor, task_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Our MoELayer's signature; DeepSpeed's gate routes by token only (task ids are not used by this bench)."""
        out, l_aux, _ = self.moe(x)
        return out, self.aux_loss_coef * l_aux


def swap_in_deepspeed_moe(model: nn.Module, cfg: MoEConfig, ep: int, ep_rank: int) -> None:
    """Replace every MoE layer of our (unsharded) model by DeepSpeed's, with the same weights."""
    for block in model.layers:
        if block.moe is not None:
            ds = DeepSpeedMoEFFN(model.cfg.d_model, cfg, ep)
            ds.copy_from(block.moe, ep_rank)
            block.moe = ds


def local_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class DeepSpeedEngine(ZeroEngine):
    """ZeroEngine (forward, backward, clip, step, optimizer, scheduler) around DeepSpeed's own MoE model:
    `deepspeed.initialize` with the config, optimizer groups and schedule moe_train/parallel/zero.py builds for
    ours, without the marker (this model holds real `MoE` layers)."""

    def __init__(self, model: nn.Module, cfg: Config, ctx: ParallelContext, micro_batch_size: int):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        init_deepspeed_comm(cfg.parallel.backend)
        create_expert_groups(ctx)  # collective; checks DeepSpeed's ep/edp groups equal our mesh's (the copy needs it)
        o = cfg.optim
        optimizer = torch.optim.AdamW(optimizer_groups(model, o.weight_decay, has_experts=True), lr=o.lr,
                                      betas=(o.beta1, o.beta2), eps=o.eps)
        scheduler = build_scheduler(optimizer, o, cfg.train.max_steps)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(cfg, micro_batch_size, ctx.dims.dp))


class DeepSpeedMoETrainer(Trainer):
    """Our Trainer (data, step code, evaluation) around the transformer with DeepSpeed's MoE layers."""

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.model, self.cfg.moe, self.device, seed=self.cfg.train.seed)  # ours' weights
        swap_in_deepspeed_moe(model, self.cfg.moe, self.ctx.dims.ep, self.ctx.ep_rank)
        return model

    def build_engine(self) -> DeepSpeedEngine:
        return DeepSpeedEngine(self.model, self.cfg, self.ctx, self.micro_batch_size)  # collective

    def describe_model(self) -> str:
        return f"{local_params(self.model) / 1e6:.2f}M parameters on this rank"


TRAINERS = {"ours": Trainer, "deepspeed": DeepSpeedMoETrainer}


# -- inside torchrun --------------------------------------------------------------------------------------------------
class RankContender(Contender):
    """train_e2e's Contender whose timed step ends with a barrier (the slower rank decides the step time)."""

    def sync(self) -> None:
        dist.barrier()  # collective

    def summary(self) -> dict:
        return {"label": LABELS[self.name], "params_per_rank": local_params(self.trainer.model),
                "tokens_per_s": self.tokens_per_s(), "step_seconds": self.step_seconds,
                "train_loss": self.train_loss, "val_loss": {str(k): v for k, v in self.val_loss.items()}}


def rank_main(args: argparse.Namespace) -> None:
    """One rank: build the trainers of --models, train them in lockstep, write rank 0's report to --result."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its per-layer INFO lines would bury the progress
    env = read_launch_env()
    cfg = ep_config(args)
    ctx = init_parallel(env, validate_config(cfg, env.world_size), torch.device("cpu"), cfg.parallel.timeout_s)
    names = args.models.split(",")
    with tempfile.TemporaryDirectory() as run_dir:
        contenders = [RankContender(n, TRAINERS[n](cfg, Path(run_dir) / n, ctx, torch.device("cpu")))
                      for n in names]
        check_batches_agree(contenders)
        with contextlib.redirect_stderr(io.StringIO()) if env.rank else contextlib.nullcontext():  # rank 0 reports
            train_lockstep(contenders, args.steps, args.log_every)
        check_batches_agree(contenders)
        for contender in contenders:
            contender.trainer.metrics.close()
    rss = [None] * env.world_size
    dist.all_gather_object(rss, proc_status_mib("VmHWM"))  # collective
    if env.rank == 0:
        data = contenders[0].trainer.data
        report = {"meta": {"train_tokens": data.num_train_tokens, "val_tokens": data.num_val_tokens,
                           "threads": torch.get_num_threads()},
                  "models": {c.name: c.summary() for c in contenders}, "peak_rss_mib_per_rank": rss}
        Path(args.result).write_text(json.dumps(report))
    shutdown(ctx)


# -- orchestration ----------------------------------------------------------------------------------------------------
RANK_FLAGS = ("data", "seed", "seq_len", "batch_size", "grad_accum", "val_batches", "d_model", "eval_every",
              "log_every")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, models: list[str], steps: int, eval_every: int, result: Path) -> dict:
    """torchrun --nproc_per_node 2 on this script; the ranks' output goes to this process's stdout/stderr."""
    flags = []
    for key in RANK_FLAGS:
        value = {"eval_every": eval_every}.get(key, getattr(args, key))
        flags += [f"--{key.replace('_', '-')}", str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__), "--rank-main", *flags,
           "--steps", str(steps), "--models", ",".join(models), "--result", str(result)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": str(args.threads),
           "DS_ACCELERATOR": "cpu"}  # CPU and gloo only; also spares DeepSpeed's accelerator-detection warning
    proc = subprocess.run(cmd, env=env, stdout=2)  # fd 2: the ranks' lines go to stderr, stdout keeps the report
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"torchrun exited with {proc.returncode} ({' '.join(models)}, {steps} steps); "
                           f"see the ranks' output above")
    return json.loads(result.read_text())


def measure_rss(args: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Peak RSS per rank of each model training --rss-steps steps alone in a fresh launch."""
    return {name: launch(args, [name], args.rss_steps, 0, tmp / f"rss_{name}.json")["peak_rss_mib_per_rank"]
            for name in MODELS}


# -- report -----------------------------------------------------------------------------------------------------------
def header(args: argparse.Namespace, argv: list[str], meta: dict) -> str:
    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
    micro = args.batch_size // (args.grad_accum * WORLD)
    return (f"$ {command}\n\n"
            f"device: {device_description('cpu')}; gloo, world {WORLD} (ep {EP}, ZeRO stage {ZERO_STAGE}), "
            f"{meta['threads']} thread(s) per rank; torch {torch.__version__}, deepspeed {deepspeed.__version__}; "
            f"float32\n"
            f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val bytes of {Path(args.data).name}; "
            f"seq {args.seq_len} x global batch {args.batch_size} (micro-batch {micro} x {args.grad_accum} per rank); "
            f"{args.steps} steps in lockstep (order alternating); AdamW lr 3e-3, 30 warm-up, cosine to 3e-4 at step "
            f"{args.steps}; val = {args.val_batches} fixed batches of {args.batch_size}\n"
            f"MoE: 8 SwiGLU experts of width {2 * args.d_model}, top-2, capacity factor {CAPACITY_FACTOR} (train and "
            f"eval), min_capacity {MIN_CAPACITY}, aux loss 0.01 (first-choice counting), no second-expert "
            f"sampling, no noise\n")


def fmt_rss(values: Optional[list[float]]) -> str:
    return " / ".join(f"{v:.0f}" for v in values) if values else "-"


def speed_table(results: dict, rss: dict) -> str:
    cols = ("model", "params per rank", "median step ms", "tokens/s", "ours speed-up (totals)",
            "ours speed-up (median per step)", "peak RSS MiB rank 0 / 1 (alone)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ours = results["ours"]
    for name, r in results.items():
        cells = [r["label"], f"{r['params_per_rank'] / 1e6:.2f}M", f"{statistics.median(r['step_seconds']) * 1e3:.0f}",
                 f"{r['tokens_per_s']:,.0f}", fmt_ratio(ours["tokens_per_s"], r["tokens_per_s"]),
                 fmt_ratio(paired_step_ratio(r, ours), 1.0), fmt_rss(rss.get(name))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_target(results: dict) -> str:
    ratio = results["ours"]["tokens_per_s"] / results["deepspeed"]["tokens_per_s"]
    verdict = "met" if ratio >= SPEEDUP_TARGET else f"missed by {SPEEDUP_TARGET - ratio:.2f}x"
    return f"{verdict}: {ratio:.2f}x DeepSpeed's tokens/s (target >= {SPEEDUP_TARGET}x)"


def loss_target(results: dict) -> str:
    ours, theirs = results["ours"]["val_loss"], results["deepspeed"]["val_loss"]
    if not ours:
        return "n/a (no evaluation)"
    last = str(max(int(s) for s in ours))
    verdict = "met" if ours[last] <= theirs[last] else "missed"
    return (f"{verdict}: ours {ours[last]:.4f} vs DeepSpeed {theirs[last]:.4f} at step {last} "
            f"({ours[last] - theirs[last]:+.4f} nats; target: no higher)")


def first_step_check(results: dict) -> str:
    ours, theirs = results["ours"]["train_loss"][0], results["deepspeed"]["train_loss"][0]
    return (f"Step-1 training loss (same weights, same batch, rank 0): ours {ours:.6f}, DeepSpeed {theirs:.6f} "
            f"(difference {abs(ours - theirs):.1e})")


def format_report(args: argparse.Namespace, argv: list[str], run: dict) -> str:
    results, targets = run["models"], run["targets"]
    return "\n".join([
        header(args, argv, run["meta"]), speed_table(results, run["rss"]), "",
        f"Tokens/s: global tokens ({args.batch_size} x {args.seq_len} per step) / summed training-step time (each "
        f"step closed by a barrier; evaluation excluded), {args.steps} steps each; speed-up = ours tokens/s / the "
        f"row's. Peak RSS: each model alone for {args.rss_steps} steps in a fresh launch (VmHWM); the lockstep run "
        f"(both models per process) peaked at {fmt_rss(run['peak_rss_mib_per_rank'])} MiB per rank.", "",
        first_step_check(results), "",
        "Validation loss (nats/byte, mean over the fixed validation batches of both ranks):", "",
        val_table(results), "",
        "Targets:", f"- speed: {targets['speed']}", f"- quality: {targets['quality']}", ""])


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.relpath(DEFAULT_DATA), help="text file, read as bytes")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (the cosine reaches 3e-4 at the last)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="init and loader order")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks share the 2 cores)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="global batch, sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, choices=(1, 2), default=1,
                   help="accumulation steps per rank: micro-batch = batch / (2 x this)")
    p.add_argument("--val-batches", type=int, default=20, help="fixed validation batches of --batch-size sequences")
    p.add_argument("--d-model", type=int, default=256, help="width (experts 2x); smaller for tests")
    p.add_argument("--rss-steps", type=int, default=None,
                   help="steps of each model alone for its peak RSS (default min(10, --steps)); 0 = skip")
    p.add_argument("--log-every", type=int, default=10, help="progress line every this many steps (stderr)")
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--json", help="write the raw curves and figures here")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)  # internal: one torchrun rank
    p.add_argument("--models", default=",".join(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rank_main:
        rank_main(args)
        return {}
    if args.rss_steps is None:
        args.rss_steps = min(10, args.steps)
    ep_config(args)  # configuration errors here, before any launch
    with tempfile.TemporaryDirectory() as tmp:
        run = launch(args, list(MODELS), args.steps, args.eval_every, Path(tmp) / "lockstep.json")
        run["rss"] = measure_rss(args, Path(tmp)) if args.rss_steps > 0 else {}
    run["targets"] = {"speed": speed_target(run["models"]), "quality": loss_target(run["models"])}
    run["settings"] = vars(args)
    report = format_report(args, argv, run)
    print(report, flush=True)
    for path, text in ((args.out, report), (args.json, json.dumps(run, indent=1))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    return run


if __name__ == "__main__":
    main()
