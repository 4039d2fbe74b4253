"""Around pre-training, on this project's own data: (a) sparse upcycling against continued dense training and an MoE
from scratch at equal extra compute; (b) fine-tuning a pre-trained MoE and its dense twin on instruction data with
the recipes the MoE literature recommends (freezing, expert dropout, learning rate and batch size).

Setup. Pre-training data: the embedded six-domain corpus (1 MB, bytes; data=embedded), seq 128, AdamW with the
default schedule (lr 3e-3, 30 warm-up steps, cosine). Models: `tiny_dense` (d 256, 4 layers, SwiGLU FFN 1024) and
`tiny` (8 experts of width 512, top-2, dropless, routed_scale 2): the same active FFN width, so the same FLOPs per
token up to the router (printed).

(a) Upcycling. The dense model trains --pretrain steps. Then, for --extra more steps each (a fresh optimizer and
schedule for every arm): (i) the dense model continues (init.from its weights); (ii) the MoE upcycled from it
(init.upcycle=true, granularity 2: each dense FFN cut into 2 expert slices, 4 copies of each, router groups tied,
so the MoE computes the dense function at step 0 with the dense FLOPs per token); (iii) the MoE trained from scratch
for --pretrain + --extra steps, the whole budget. Validation loss every --eval-every steps (16 fixed batches).

(b) Fine-tuning. Both models pre-trained --pretrain steps (the dense one is (a)'s), then fine-tuned --finetune
steps on the generated instruction set (data=chat, --records records: 80% train, 20% held out; loss on response
tokens only), several epochs over it, so overfitting shows; every arm evaluates the same 12 held-out micro-batches
of 8 sequences (batch 32 = 4 accumulated micro-batches). Arms: learning rate {--lr-low, --lr-high} x batch size
{8, 32} for both models; for the MoE at (--lr-high, batch 8) also: router + experts frozen ("freeze MoE"),
everything else frozen ("freeze non-MoE"), and moe.expert_dropout=0.4. Reported: held-out loss at the end and its
best over the run, the training-records loss (eval mode, same number of batches) and their gap (held-out - train)
as the overfitting measure.

Run (about 40 minutes on 2 CPU cores):
    python bench/finetune.py --json bench/results/finetune.json --out bench/results/finetune.md \
        --plot docs/img/finetune.png
Quick check (a minute): python bench/finetune.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere, without an installed package

from moe_train.cli_config import compose_config  # noqa: E402
from moe_train.config.schema import validate_config  # noqa: E402
from moe_train.data.build import split_streams  # noqa: E402
from moe_train.data.loader import ValidationBatches  # noqa: E402
from moe_train.interop.hf import save_weights  # noqa: E402
from moe_train.models.params import flops_per_token  # noqa: E402
from moe_train.training.trainer import Trainer, loss_sums  # noqa: E402

NON_MOE = "[attention,dense_ffn,embeddings,norms,lm_head]"
QUICK_SHAPE = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=256", "moe.d_ff=128",
               "data.embedded_size=200000"]


@dataclass
class Settings:
    pretrain: int
    extra: int
    finetune: int
    eval_every: int
    records: int
    lr_low: float
    lr_high: float
    shape: list[str]
    extra_lr: Optional[float] = None  # peak LR of (a)'s extra arms (None: the pre-training default, 3e-3)


# -- one training run -----------------------------------------------------------------------------------------------
def val_curve(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


@torch.no_grad()
def train_records_loss(trainer: Trainer) -> float:
    """Eval-mode loss on the first training records (the held-out set's number of batches): the fit to what it saw."""
    cfg = trainer.cfg
    train, _, _ = split_streams(cfg.data, trainer.data.tokenizer, lambda message: None)
    tokens, labels = train.tokens, train.labels
    batches = ValidationBatches(tokens, cfg.train.seq_len, trainer.micro_batch_size, 0, 1, len(trainer.data.val),
                                labels)
    with trainer.engine.evaluation():
        loss_sum, count = loss_sums(trainer.forward_logits, batches, trainer.device).tolist()
    return loss_sum / max(count, 1.0)


def run(name: str, overrides: list[str], work: Path, measure_train: bool = False) -> dict:
    """Train one arm in this process; its weights are saved for the arms that start from it, with the run's
    config.yaml beside them (as moe-train writes it), so moe-train-eval and moe-train-compress read its data."""
    cfg = compose_config(overrides)
    validate_config(cfg)
    run_dir = work / name
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, run_dir)
    step0 = trainer.evaluate() if cfg.init.path is not None else None
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    save_weights(trainer.model, run_dir / "weights.safetensors")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))  # read by moe-train-eval
    curve = val_curve(run_dir)
    result = {"name": name, "overrides": overrides, "val_loss": curve, "final_val": curve[max(curve)],
              "best_val": min(curve.values()), "step0_val": step0, "seconds": seconds,
              "flops_per_token": flops_per_token(trainer.model, cfg.train.seq_len),
              "weights": str(run_dir / "weights.safetensors")}
    if measure_train:
        result["train_loss"] = train_records_loss(trainer)
        result["gap"] = result["final_val"] - result["train_loss"]
    print(f"  {name}: final val {result['final_val']:.4f} (best {result['best_val']:.4f}) in {seconds:.0f} s",
          flush=True)
    return result


# -- (a) upcycling ----------------------------------------------------------------------------------------------------
def common(s: Settings, steps: int) -> list[str]:
    return [*s.shape, "train.seq_len=128", "train.batch_size=16", "train.progress=false", "train.log_every=10",
            "train.eval_batches=16", f"train.eval_every={s.eval_every}", f"train.max_steps={steps}"]


def upcycling(s: Settings, work: Path) -> dict:
    dense = run("dense_pretrain", ["model=tiny_dense", *common(s, s.pretrain)], work)
    extra = [f"init.from={dense['weights']}"]
    if s.extra_lr is not None:  # the extra arms restart from a converged model: a lower peak than pre-training's
        extra += [f"optim.lr={s.extra_lr}", f"optim.min_lr={s.extra_lr / 10}"]
    arms = {
        "dense_continued": ["model=tiny_dense", *common(s, s.extra), *extra],
        "upcycled": [*common(s, s.extra), *extra, "init.upcycle=true", "init.upcycle_granularity=2"],
        "moe_scratch": common(s, s.pretrain + s.extra),
    }
    return {"dense_pretrain": dense, **{name: run(name, args, work) for name, args in arms.items()}}


# -- (b) fine-tuning ----------------------------------------------------------------------------------------------
def finetune_args(s: Settings, source: str, lr: float, batch: int, model: Optional[str]) -> list[str]:
    """Micro-batches of 8 whatever the batch size (accumulation), so every arm is evaluated on the same held-out
    micro-batches."""
    chat = ["data=chat", f"data.chat_examples={s.records}", "data.val_fraction=0.2", "train.eval_batches=12"]
    base = [*common(s, s.finetune), *chat, f"train.batch_size={batch}", f"train.grad_accum_steps={batch // 8}",
            f"optim.lr={lr}", f"optim.min_lr={lr / 10}", "optim.warmup_steps=10", f"init.from={source}"]
    return base + ([f"model={model}"] if model else [])


def finetuning(s: Settings, work: Path, dense_source: str) -> dict:
    moe = run("moe_pretrain", common(s, s.pretrain), work)
    results = {"moe_pretrain": moe}
    for kind, source, model in (("moe", moe["weights"], None), ("dense", dense_source, "tiny_dense")):
        for lr in (s.lr_low, s.lr_high):
            for batch in (8, 32):
                name = f"{kind}_lr{lr:g}_bs{batch}"
                results[name] = run(name, finetune_args(s, source, lr, batch, model), work, measure_train=True)
    base = finetune_args(s, moe["weights"], s.lr_high, 8, None)
    for name, extra in (("moe_freeze_moe", f"finetune.freeze=[router,experts]"),
                        ("moe_freeze_non_moe", f"finetune.freeze={NON_MOE}"),
                        ("moe_expert_dropout", "moe.expert_dropout=0.4")):
        results[name] = run(name, [*base, extra], work, measure_train=True)
    return results


# -- report -----------------------------------------------------------------------------------------------------------
def upcycling_table(r: dict, s: Settings) -> list[str]:
    dense_fpt, moe_fpt = r["dense_pretrain"]["flops_per_token"], r["moe_scratch"]["flops_per_token"]
    rows = [("dense pre-trained (start of every arm)", s.pretrain, r["dense_pretrain"]),
            ("(i) dense continued", s.extra, r["dense_continued"]),
            ("(ii) MoE upcycled from it (g=2)", s.extra, r["upcycled"]),
            ("(iii) MoE from scratch, whole budget", s.pretrain + s.extra, r["moe_scratch"])]
    lines = [f"FLOPs per token: dense {dense_fpt / 1e6:.1f}M, MoE {moe_fpt / 1e6:.1f}M "
             f"(ratio {moe_fpt / dense_fpt:.3f})", "",
             "| arm | steps | val loss at its start | final val loss | best val loss |", "|---|---:|---:|---:|---:|"]
    for label, steps, res in rows:
        start = "" if res["step0_val"] is None else f"{res['step0_val']:.4f}"
        lines.append(f"| {label} | {steps} | {start} | {res['final_val']:.4f} | {res['best_val']:.4f} |")
    return lines


def finetuning_table(r: dict) -> list[str]:
    lines = ["| arm | final held-out | best held-out | train records | gap (held-out - train) |",
             "|---|---:|---:|---:|---:|"]
    for name, res in r.items():
        if "gap" in res:
            lines.append(f"| {name} | {res['final_val']:.4f} | {res['best_val']:.4f} | {res['train_loss']:.4f} | "
                         f"{res['gap']:+.4f} |")
    return lines


def report(results: dict, s: Settings, command: str) -> str:
    parts = [f"Command: `{command}`"]
    if "upcycling" in results:
        parts += ["", "(a) Sparse upcycling at equal extra compute", "", *upcycling_table(results["upcycling"], s)]
    if "finetuning" in results:
        parts += ["", "(b) Fine-tuning on the instruction set", "", *finetuning_table(results["finetuning"])]
    return "\n".join(parts) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [key for key in ("upcycling", "finetuning") if key in results]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        (plot_upcycling if part == "upcycling" else plot_finetuning)(ax, results[part])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _curve(res: dict, shift: int = 0) -> tuple[list[int], list[float]]:
    """(steps, val losses) of a JSON result (its keys are strings), with the step-0 evaluation when there is one."""
    points = sorted((int(k) + shift, v) for k, v in res["val_loss"].items())
    if res.get("step0_val") is not None:
        points.insert(0, (shift, res["step0_val"]))
    return [p[0] for p in points], [p[1] for p in points]


def plot_upcycling(ax, up: dict) -> None:
    pre = max(int(k) for k in up["dense_pretrain"]["val_loss"])
    ax.plot(*_curve(up["dense_pretrain"]), "k.-", label="dense pre-training")
    for name, shift in (("dense_continued", pre), ("upcycled", pre), ("moe_scratch", 0)):
        ax.plot(*_curve(up[name], shift), "o-", ms=4, label=name)
    ax.set(xlabel="step (the extra arms start after pre-training)", ylabel="validation loss (nats/byte)",
           title="(a) upcycling vs continued dense vs MoE from scratch")
    ax.set_ylim(top=min(ax.get_ylim()[1], 0.8))
    ax.legend(), ax.grid(alpha=0.3)


def plot_finetuning(ax, arms: dict) -> None:
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab20").colors
    for i, (name, res) in enumerate(name_res for name_res in arms.items() if "gap" in name_res[1]):
        ax.plot(*_curve(res), "-" if name.startswith("moe") else "--", color=colors[i % 20], label=name)
    ax.set(xlabel="fine-tuning step", ylabel="held-out loss (response tokens)", title="(b) fine-tuning")
    ax.set_ylim(top=1.4)  # the pre-trained models start near 7 on the instruction format
    ax.legend(fontsize=7), ax.grid(alpha=0.3)


def settings(args) -> Settings:
    if args.quick:
        return Settings(pretrain=20, extra=20, finetune=10, eval_every=10, records=1000, lr_low=3e-4, lr_high=1e-3,
                        shape=QUICK_SHAPE, extra_lr=args.extra_lr)
    return Settings(args.pretrain, args.extra, args.finetune, args.eval_every, args.records, args.lr_low,
                    args.lr_high, [], args.extra_lr)


def run_parts(s: Settings, parts: str, work: Path) -> dict:
    """(a) and/or (b); (b) needs (a)'s dense pre-training, run alone when (a) is not asked for."""
    results: dict = {"settings": vars(s)}
    if "a" in parts:
        results["upcycling"] = upcycling(s, work)
        dense = results["upcycling"]["dense_pretrain"]
    elif "b" in parts:
        dense = run("dense_pretrain", ["model=tiny_dense", *common(s, s.pretrain)], work)
    if "b" in parts:
        results["finetuning"] = finetuning(s, work, dense["weights"])
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", type=int, default=400)
    parser.add_argument("--extra", type=int, default=400)
    parser.add_argument("--finetune", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--lr-low", type=float, default=3e-4)
    parser.add_argument("--lr-high", type=float, default=1e-3)
    parser.add_argument("--extra-lr", type=float, default=None,
                        help="peak LR of (a)'s extra arms (default: pre-training's 3e-3)")
    parser.add_argument("--parts", default="ab", help="'a' (upcycling), 'b' (fine-tuning) or 'ab'")
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke test")
    parser.add_argument("--json"), parser.add_argument("--out"), parser.add_argument("--plot")
    parser.add_argument("--replot", metavar="JSON", help="only redraw --plot from a --json file of an earlier run")
    args = parser.parse_args(argv)
    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        plot(results, args.plot)
        return results
    s = settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        results = run_parts(s, args.parts, Path(tmp))
    text = report(results, s, "python bench/finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(text)
    for path, content in ((args.json, json.dumps(results, indent=1)), (args.out, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
