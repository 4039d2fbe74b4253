"""End-to-end training side by side: our MoE, transformers' MixtralForCausalLM of the same shape, our dense twin.

Setup (the public figures of docs/BENCHMARKS.md): tinyshakespeare as bytes (first 90% trains, last 10% validates),
seq 256, batch 16, float32; AdamW lr 3e-3, 30 warm-up steps, cosine to 3e-4 at step 600, weight decay 0.1 on
matrices, beta2 0.95, gradient clipping 1.0. Models: d 256, 4 layers, 8 heads / 4 kv heads, byte vocabulary;
ours = the `tiny` preset (8 SwiGLU experts of width 512, top-2, dropless, aux loss 0.01 first-choice counting);
HF = MixtralForCausalLM with its default experts implementation (router_aux_loss_coef 0.01); dense = the `tiny_dense`
twin (SwiGLU FFN of width 1024: the same active parameters per token).

Method. The machine is noisy, so absolute times mean little and ratios are measured side by side: ONE process
builds one `Trainer` per model (same seed, so the same loader order and the same init RNG state) and runs them in
lockstep; at step i each model takes its step i on the same batch, in an order rotated every step so no model always
runs first. The timed region is `Trainer.train_step` itself (next batch, forward, LM cross-entropy + aux loss,
backward, clip, AdamW, schedule), so all three run the very same loop code; tokens/s = tokens / summed step time.
HF enters through `MixtralLM`, an adapter with our model's forward contract: the LM loss is our `lm_loss` on its
logits with our targets (identical for all three), plus 0.01 x its own `aux_loss` (load_balancing_loss_func).
Validation: mean LM loss over the same fixed 20 batches, eval mode, every --eval-every steps and at the end. Expert
shares: per layer, each expert's fraction of the token-expert assignments over those validation batches, at the end.
Peak RSS: three models in one process cannot be told apart, so each model also runs --rss-steps steps alone in a
fresh subprocess (this script with --rss-child) that reports its VmHWM.

Run (20-40 min on 2 CPU cores):
    python bench/train_e2e.py --out bench/results/train_e2e.md --json bench/results/train_e2e.json \
        --plot docs/img/train_e2e.png
Quick check (about a minute): python bench/train_e2e.py --steps 20 --eval-every 10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere, without an installed package

from moe_train.config.data import DataConfig  # noqa: E402
from moe_train.config.model import ModelConfig  # noqa: E402
from moe_train.config.moe import MoEConfig  # noqa: E402
from moe_train.config.optim import OptimConfig  # noqa: E402
from moe_train.config.schema import Config, validate_config  # noqa: E402
from moe_train.config.train import TrainConfig  # noqa: E402
from moe_train.models.params import count_parameters  # noqa: E402
from moe_train.training.trainer import Trainer  # noqa: E402

MODELS = ("ours", "hf", "dense")
LABELS = {"ours": "moe_train MoE", "hf": "transformers MixtralForCausalLM", "dense": "moe_train dense twin"}
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HF_AUX_LOSS_COEF = 0.01  # router_aux_loss_coef of the HF model (ours: moe.aux_loss_coef, default 0.01)
SPEEDUP_TARGET = 1.2  # ours must reach this multiple of HF's tokens/s
SHARE_BOUNDS = (0.02, 0.30)  # every expert's share of its layer's assignments (uniform: 1/8 = 12.5%)


# -- configuration ------------------------------------------------------------------------------------------------
def parse_overrides(cfg: MoEConfig, text: str) -> MoEConfig:
    """`key=value,key=value` on MoEConfig fields (for router investigations), typed like each field's default."""
    if not text:
        return cfg
    fields = {f.name: type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields:
            raise ValueError(f"--moe {item!r}: unknown MoEConfig field {key!r}; known: {', '.join(fields)}")
        kind = fields[key]
        changes[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return dataclasses.replace(cfg, **changes)


def base_config(args: argparse.Namespace) -> Config:
    """Our MoE as the `tiny` preset (+ `--moe` overrides) on the text file, with the benchmark's optimizer."""
    d = args.d_model
    model = ModelConfig(vocab_size=256, d_model=d, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=4 * d,
                        max_seq_len=args.seq_len)
    moe = parse_overrides(MoEConfig(num_experts=8, top_k=2, d_ff=2 * d, capacity_factor=-1.0,
                                    eval_capacity_factor=-1.0, routed_scale=2.0), args.moe)
    data = DataConfig(source="text", path=str(args.data), val_fraction=0.1, seed=args.seed)
    optim = OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=30, schedule="cosine", weight_decay=0.1, beta2=0.95,
                        grad_clip=1.0)
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                        device=args.device, eval_every=args.eval_every, eval_batches=args.val_batches,
                        progress=False)
    cfg = Config(model=model, moe=moe, data=data, optim=optim, train=train)
    validate_config(cfg)
    return cfg


def config_for(name: str, base: Config) -> Config:
    """The dense twin: every FFN dense, width top_k * expert width (same active parameters per token)."""
    if name != "dense":
        return base
    d_ff = base.moe.top_k * base.moe.d_ff
    return dataclasses.replace(base, model=dataclasses.replace(base.model, moe_every=0, d_ff=d_ff))


def mixtral_config(cfg: Config):
    from transformers import MixtralConfig

    m = cfg.model
    return MixtralConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=cfg.moe.d_ff,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads,
                         num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                         max_position_embeddings=m.max_seq_len, output_router_logits=True,
                         router_aux_loss_coef=HF_AUX_LOSS_COEF, tie_word_embeddings=False, rope_theta=m.rope_theta,
                         rms_norm_eps=m.norm_eps, initializer_range=m.init_std)


# -- the HF model behind our trainer --------------------------------------------------------------------------------
class MixtralLM(nn.Module):
    """MixtralForCausalLM with our model's contract, `forward(ids, return_aux) -> logits or (logits, aux)`, so the
    HF model trains through the very same `Trainer.train_step` as ours. The LM loss is then our `lm_loss` on HF's
    logits with our (already shifted) targets; aux = router_aux_loss_coef x HF's load_balancing_loss_func, the term
    HF itself adds when given labels."""

    layers = ()  # holds no moe_train MoE blocks: the trainer's MoEStatsAccumulator finds none

    def moe_layers(self) -> Iterator[nn.Module]:
        return iter(())  # likewise (its experts are HF modules; param_counts counts them)

    def __init__(self, config):
        super().__init__()
        from transformers import MixtralForCausalLM

        self.hf = MixtralForCausalLM(config)
        self.aux_coef, self.top_k = config.router_aux_loss_coef, config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.last_router_logits: tuple = ()

    def forward(self, input_ids_BS: torch.Tensor, return_aux: bool = False):
        out = self.hf(input_ids=input_ids_BS, use_cache=False, output_router_logits=True)
        self.last_router_logits = tuple(logits.detach() for logits in out.router_logits)
        return (out.logits, self.aux_coef * out.aux_loss) if return_aux else out.logits

    def router_counts(self) -> torch.Tensor:
        """[layers, E] token-expert assignments of the last forward (its top-k of the router softmax)."""
        return torch.stack([torch.bincount(logits.topk(self.top_k, dim=-1).indices.flatten(),
                                           minlength=self.num_experts) for logits in self.last_router_logits])

    def experts_implementation(self) -> str:
        config = self.hf.config
        return f"{config._experts_implementation} experts, {config._attn_implementation} attention"


class MixtralTrainer(Trainer):
    """Our Trainer with the HF model swapped in (same data, optimizer policy, schedule and step code)."""

    def build_model(self) -> MixtralLM:
        return MixtralLM(mixtral_config(self.cfg)).to(self.device)

    def describe_model(self) -> str:
        total, active = param_counts(self.model)
        return f"{total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token"


def build_trainer(name: str, base: Config, run_dir: Path, router_std: Optional[float] = None) -> Trainer:
    """Seeds with train.seed inside (same init RNG state and loader order for every model)."""
    trainer_cls = MixtralTrainer if name == "hf" else Trainer
    trainer = trainer_cls(config_for(name, base), run_dir)
    if name == "ours":
        reinit_routers(trainer.model, router_std)
    return trainer


def reinit_routers(model: nn.Module, router_std: Optional[float]) -> None:
    """A knob the library has no setting for, used only to investigate the quality target: re-initialise the routers
    N(0, router_std), in place (the optimizer holds the same tensors)."""
    if router_std is None:
        return
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.weight.normal_(0.0, router_std)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, active per token); HF's experts are the parameters under `.experts.`, k of E of them active."""
    if not isinstance(model, MixtralLM):
        counts = count_parameters(model)
        return counts.total, counts.active
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total, total - experts * (model.num_experts - model.top_k) // model.num_experts


# -- one model in the race ------------------------------------------------------------------------------------------
class Contender:
    """A Trainer plus what the benchmark records about it."""

    def __init__(self, name: str, trainer: Trainer):
        self.name, self.trainer = name, trainer
        self.step_seconds: list[float] = []
        self.train_loss: list[float] = []
        self.val_loss: dict[int, float] = {}

    def sync(self) -> None:
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize(self.trainer.device)

    def train_step(self) -> None:
        """One timed Trainer.train_step; the loss is read after the clock stops (on CPU nothing is pending)."""
        self.sync()
        start = time.perf_counter()
        loss, _, _ = self.trainer.train_step(collect_stats=False)
        self.sync()
        self.step_seconds.append(time.perf_counter() - start)
        self.train_loss.append(loss.item())  # host sync, outside the timed region

    def evaluate(self, step: int) -> None:
        self.val_loss[step] = self.trainer.evaluate()

    @property
    def tokens_per_step(self) -> int:
        t = self.trainer.cfg.train
        return t.batch_size * t.seq_len

    def tokens_per_s(self) -> float:
        return self.tokens_per_step * len(self.step_seconds) / max(sum(self.step_seconds), 1e-12)

    def layer_counts(self) -> Optional[torch.Tensor]:
        """[layers, E] assignments of the last forward; None for a dense model."""
        model = self.trainer.model
        if isinstance(model, MixtralLM):
            return model.router_counts().float()
        moes = list(model.moe_layers())
        return torch.stack([moe.last_stats.tokens_per_expert for moe in moes]) if moes else None

    @torch.no_grad()
    def expert_shares(self) -> Optional[list[list[float]]]:
        """Per layer, each expert's fraction of the token-expert assignments over the validation batches."""
        model, total = self.trainer.model, None
        model.eval()
        for inputs, _ in self.trainer.data.val:
            model(inputs.to(self.trainer.device))
            counts = self.layer_counts()
            total = counts if total is None else total + counts
        model.train()
        return None if total is None else (total / total.sum(dim=1, keepdim=True)).tolist()

    def summary(self) -> dict:
        total, active = param_counts(self.trainer.model)
        return {"label": LABELS[self.name], "params": total, "active_params": active,
                "tokens_per_s": self.tokens_per_s(), "step_seconds": self.step_seconds,
                "train_loss": self.train_loss, "val_loss": {str(k): v for k, v in self.val_loss.items()},
                "expert_shares": self.expert_shares()}


def rotated(contenders: list[Contender], step: int) -> list[Contender]:
    """Step i starts with contender i mod n, so each model runs first, middle and last equally often."""
    k = step % len(contenders)
    return contenders[k:] + contenders[:k]


def train_lockstep(contenders: list[Contender], steps: int, log_every: int = 10) -> None:
    """Step i of every model on the same batch, then evaluation where the trainer's schedule says so."""
    start = time.perf_counter()
    for step in range(1, steps + 1):
        for contender in rotated(contenders, step):
            contender.train_step()
        if contenders[0].trainer.should_eval(step):
            for contender in contenders:
                contender.evaluate(step)
        if step % log_every == 0 or step == steps:
            losses = " ".join(f"{c.name}={c.train_loss[-1]:.3f}" for c in contenders)
            print(f"step {step}/{steps} {losses} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)


def check_batches_agree(contenders: list[Contender]) -> None:
    """Every trainer has its own loader; same seed and data must give the same batches, or the race is unfair."""
    states = {json.dumps(c.trainer.data.train.state_dict(), sort_keys=True) for c in contenders}
    if len(states) != 1:
        raise RuntimeError(f"the loaders disagree: {states}")


# -- peak RSS, one model per fresh process --------------------------------------------------------------------------
def proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) / 1024


def rss_child(args: argparse.Namespace) -> None:
    """Train one model for --rss-steps steps alone; print one JSON line with its peak RSS (VmHWM).
    The baseline is the RSS after imports (transformers too for HF), before data and model exist."""
    if args.rss_child == "hf":
        import transformers  # noqa: F401  (part of what the HF run costs, but not of the model)
    baseline = proc_status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(args.rss_child, base_config(args), Path(run_dir), args.router_std)
        contender = Contender(args.rss_child, trainer)
        for _ in range(args.rss_steps):
            contender.train_step()
        contender.trainer.metrics.close()
    print(json.dumps({"model": args.rss_child, "peak_rss_mib": proc_status_mib("VmHWM"),
                      "baseline_rss_mib": baseline, "tokens_per_s": contender.tokens_per_s()}), flush=True)


CHILD_FLAGS = ("data", "seed", "threads", "seq_len", "batch_size", "d_model", "device", "moe", "router_std",
               "rss_steps")


def child_command(args: argparse.Namespace, name: str) -> list[str]:
    flags = []
    for key in CHILD_FLAGS:
        value = getattr(args, key)
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return [sys.executable, os.path.abspath(__file__), *flags, "--rss-child", name]


def measure_rss(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    """Each model in its own fresh interpreter; a failure becomes {"error": ...} in its row."""
    results = {}
    for name in names:
        proc = subprocess.run(child_command(args, name), capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            results[name] = json.loads(lines[-1])
        else:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            results[name] = {"error": f"exit {proc.returncode}: {tail}"}
        print(f"peak RSS {name}: {results[name]}", file=sys.stderr, flush=True)
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE).group(1)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} cores"


def header(args: argparse.Namespace, argv: list[str], meta: dict) -> str:
    import transformers

    command = shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv])
    return (f"$ {command}\n\n"
            f"device: {device_description(args.device)}; torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {torch.get_num_threads()} threads; float32; HF: {meta.get('hf_impl', '-')}\n"
            f"data: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val bytes of {Path(args.data).name}; "
            f"seq {args.seq_len} x batch {args.batch_size}; {args.steps} steps in lockstep (order rotated per step); "
            f"AdamW lr 3e-3, 30 warm-up, cosine to 3e-4; val = {args.val_batches} fixed batches\n"
            + investigation_note(args))


def investigation_note(args: argparse.Namespace) -> str:
    """Flag a run whose MoE differs from the tiny preset, so its figures are never mistaken for the public ones."""
    flags = {"--moe": args.moe or None, "--router-std": args.router_std}
    changes = [f"{flag} {value}" for flag, value in flags.items() if value is not None]
    return f"**not the tiny preset** (ours with {' '.join(changes)})\n" if changes else ""


def fmt_ratio(value: Optional[float], ref: Optional[float]) -> str:
    return f"{value / ref:.2f}" if value and ref else "-"


def paired_step_ratio(model: dict, ref: dict) -> Optional[float]:
    """Median over steps of (step time of `model` / step time of `ref` at the same step): drift cancels per pair."""
    pairs = list(zip(model["step_seconds"], ref["step_seconds"]))
    return statistics.median(m / r for m, r in pairs) if pairs else None


def speed_table(results: dict, rss: dict) -> str:
    cols = ("model", "params (active)", "median step ms", "tokens/s", "ours speed-up (totals)",
            "ours speed-up (median per step)", "peak RSS MiB", "RSS growth MiB", "RSS vs ours")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ours, ours_rss = results.get("ours"), rss.get("ours", {}).get("peak_rss_mib")
    for name, r in results.items():
        m = rss.get(name, {})
        peak, growth = m.get("peak_rss_mib"), m.get("peak_rss_mib", 0) - m.get("baseline_rss_mib", 0)
        cells = [r["label"], f"{r['params'] / 1e6:.2f}M ({r['active_params'] / 1e6:.2f}M)",
                 f"{statistics.median(r['step_seconds']) * 1e3:.0f}", f"{r['tokens_per_s']:,.0f}",
                 fmt_ratio(ours and ours["tokens_per_s"], r["tokens_per_s"]),
                 fmt_ratio(paired_step_ratio(r, ours), 1.0) if ours else "-",
                 f"{peak:.0f}" if peak else m.get("error", "-"), f"{growth:.0f}" if peak else "-",
                 fmt_ratio(peak, ours_rss)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def val_table(results: dict) -> str:
    names = list(results)
    steps = sorted({int(s) for r in results.values() for s in r["val_loss"]})
    lines = ["| step | " + " | ".join(results[n]["label"] for n in names) + " |", "|---|" + "---|" * len(names)]
    for step in steps:
        cells = [f"{results[n]['val_loss'].get(str(step), math.nan):.4f}" for n in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def share_table(results: dict) -> str:
    rows = [(r["label"], i, shares) for r in results.values() if r["expert_shares"]
            for i, shares in enumerate(r["expert_shares"])]
    if not rows:
        return "(no MoE model in this run)"
    experts = len(rows[0][2])
    lines = ["| model | layer | " + " | ".join(f"e{e}" for e in range(experts)) + " | min | max |",
             "|---|---|" + "---|" * (experts + 2)]
    for label, layer, shares in rows:
        cells = [f"{100 * s:.1f}" for s in shares] + [f"{100 * min(shares):.1f}", f"{100 * max(shares):.1f}"]
        lines.append(f"| {label} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def speed_target(results: dict) -> str:
    if "ours" not in results or "hf" not in results:
        return "n/a (needs ours and hf)"
    ratio = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    verdict = "met" if ratio >= SPEEDUP_TARGET else f"missed by {SPEEDUP_TARGET - ratio:.2f}x"
    return f"{verdict}: {ratio:.2f}x HF's tokens/s (target >= {SPEEDUP_TARGET}x)"


def loss_target(results: dict) -> str:
    if "ours" not in results or "dense" not in results:
        return "n/a (needs ours and dense)"
    last = str(max(int(s) for s in results["ours"]["val_loss"])) if results["ours"]["val_loss"] else None
    if last is None or last not in results["dense"]["val_loss"]:
        return "n/a (no evaluation)"
    ours, dense = results["ours"]["val_loss"][last], results["dense"]["val_loss"][last]
    verdict = "met" if ours < dense else "missed"
    return f"{verdict}: MoE {ours:.4f} vs dense {dense:.4f} at step {last} ({ours - dense:+.4f} nats)"


def share_target(results: dict) -> str:
    shares = (results.get("ours") or {}).get("expert_shares")
    if not shares:
        return "n/a (needs ours)"
    lo, hi = SHARE_BOUNDS
    outside = [f"layer {i} expert {e}: {100 * s:.1f}%" for i, layer in enumerate(shares)
               for e, s in enumerate(layer) if not lo <= s <= hi]
    flat = [s for layer in shares for s in layer]
    span = f"all shares in [{100 * min(flat):.1f}%, {100 * max(flat):.1f}%]"
    if not outside:
        return f"met: {span} (target [{100 * lo:.0f}%, {100 * hi:.0f}%])"
    return f"missed: {span}; outside [{100 * lo:.0f}%, {100 * hi:.0f}%]: {', '.join(outside)}"


def format_report(args: argparse.Namespace, argv: list[str], run: dict) -> str:
    results, rss = run["models"], run["rss"]
    targets = run["targets"]
    return "\n".join([
        header(args, argv, run["meta"]), speed_table(results, rss), "",
        f"Tokens/s: training steps only (evaluation excluded), {args.steps} steps each; speed-up = ours tokens/s / "
        f"the row's. Peak RSS: each model alone for {args.rss_steps} steps in a fresh process (VmHWM); growth = peak "
        f"minus the RSS after imports.", "",
        "Validation loss (nats/byte, mean over the fixed validation batches):", "", val_table(results), "",
        "Expert shares at the end (% of the layer's token-expert assignments over the validation batches; "
        "uniform = 12.5%):", "", share_table(results), "",
        "Targets:", f"- speed: {targets['speed']}", f"- quality: {targets['quality']}",
        f"- balance: {targets['balance']}", ""])


# -- main ------------------------------------------------------------------------------------------------------------
def names_parser(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """argparse type: a non-empty comma-separated list of names from `allowed`."""
    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"unknown models {bad}; allowed: {', '.join(allowed)}")
        return names

    return parse


parse_models = names_parser(MODELS)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.relpath(DEFAULT_DATA), help="text file, read as bytes")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--models", type=parse_models, default=list(MODELS), help="comma-separated: ours,hf,dense")
    p.add_argument("--seed", type=int, default=0, help="init, loader order and routing randomness")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--val-batches", type=int, default=20)
    p.add_argument("--d-model", type=int, default=256, help="width (experts 2x, dense FFN 4x); smaller for tests")
    p.add_argument("--moe", default="", help="MoEConfig overrides for ours, e.g. aux_loss_coef=0.02,z_loss_coef=1e-3")
    p.add_argument("--router-std", type=float, default=None,
                   help="re-initialise our routers N(0, std) (default: the model's init_std, 0.02)")
    p.add_argument("--rss-steps", type=int, default=None,
                   help="steps of each peak-RSS subprocess (default min(30, --steps)); 0 = skip")
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--json", help="write the raw curves and figures here")
    p.add_argument("--plot", help="write the PNG (loss curves + expert shares) here; needs matplotlib")
    p.add_argument("--rss-child", choices=MODELS, help=argparse.SUPPRESS)  # internal: one model, alone
    return p.parse_args(argv)


def run_benchmark(args: argparse.Namespace) -> dict:
    base = base_config(args)
    with tempfile.TemporaryDirectory() as run_dir:
        contenders = [Contender(n, build_trainer(n, base, Path(run_dir), args.router_std))
                      for n in args.models]
        check_batches_agree(contenders)
        train_lockstep(contenders, args.steps)
        check_batches_agree(contenders)
        for contender in contenders:
            contender.trainer.metrics.close()
    data = contenders[0].trainer.data
    meta = {"train_tokens": data.num_train_tokens, "val_tokens": data.num_val_tokens}
    meta.update({"hf_impl": c.trainer.model.experts_implementation() for c in contenders if c.name == "hf"})
    return {"meta": meta, "models": {c.name: c.summary() for c in contenders}}


def write_outputs(args: argparse.Namespace, report: str, run: dict) -> None:
    for path, text in ((args.out, report), (args.json, json.dumps(run, indent=1))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    if args.plot:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from plot_e2e import plot  # matplotlib only when asked for

        plot(run, args.plot)


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.rss_steps is None:
        args.rss_steps = min(30, args.steps)  # the peak comes within the first steps (AdamW state, then steady)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return {}
    run = run_benchmark(args)
    run["rss"] = measure_rss(args, args.models) if args.rss_steps > 0 else {}
    run["targets"] = {"speed": speed_target(run["models"]), "quality": loss_target(run["models"]),
                      "balance": share_target(run["models"])}
    run["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = format_report(args, argv, run)
    print(report, flush=True)
    write_outputs(args, report, run)
    return run


if __name__ == "__main__":
    main()
