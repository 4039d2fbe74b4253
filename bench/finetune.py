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

Run (about 25 minutes on 2 CPU cores):
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


# -- one training run -----------------------------------------------------------------------------------------------
def val_curve(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r}


@torch.no_grad()
def train_records_loss(trainer: Trainer) -> float:
    """Eval-mode loss on the first training records (the held-out set's number of batches): the fit to what it saw."""
    cfg = trainer.cfg
    tokens, labels, _, _ = split_streams(cfg.data, trainer.data.tokenizer, lambda message: None)
    batches = ValidationBatches(tokens, cfg.train.seq_len, trainer.micro_batch_size, 0, 1, len(trainer.data.val),
                                labels)
    with trainer.engine.evaluation():
        loss_sum, count = loss_sums(trainer.forward_logits, batches, trainer.device).tolist()
    return loss_sum / max(count, 1.0)


def run(name: str, overrides: list[str], work: Path, measure_train: bool = False) -> dict:
    """Train one arm in this process; its weights are saved for the arms that start from it."""
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
    source = f"init.from={dense['weights']}"
    arms = {
        "dense_continued": ["model=tiny_dense", *common(s, s.extra), source],
        "upcycled": [*common(s, s.extra), source, "init.upcycle=true", "init.upcycle_granularity=2"],
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
    parts = [f"Command: `{command}`", "", "(a) Sparse upcycling at equal extra compute", "",
             *upcycling_table(results["upcycling"], s), "", "(b) Fine-tuning on the instruction set", "",
             *finetuning_table(results["finetuning"])]
    return "\n".join(parts) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    up = results["upcycling"]
    offset = up["dense_pretrain"]["val_loss"]
    pre = max(offset)
    left.plot(list(offset), list(offset.values()), "k.-", label="dense pre-training")
    for name, shift in (("dense_continued", pre), ("upcycled", pre), ("moe_scratch", 0)):
        curve = up[name]["val_loss"]
        left.plot([k + shift for k in curve], list(curve.values()), "o-", label=name)
    left.set(xlabel="step (extra arms start after pre-training)", ylabel="validation loss (nats/byte)",
             title="(a) upcycling vs continued dense vs MoE from scratch")
    left.legend(), left.grid(alpha=0.3)
    for name, res in results["finetuning"].items():
        if "gap" in res:
            curve = res["val_loss"]
            right.plot(list(curve), list(curve.values()), "-" if name.startswith("moe") else "--", label=name)
    right.set(xlabel="fine-tuning step", ylabel="held-out loss (response tokens)", title="(b) fine-tuning")
    right.legend(fontsize=7), right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def settings(args) -> Settings:
    if args.quick:
        return Settings(pretrain=20, extra=20, finetune=10, eval_every=10, records=1000, lr_low=3e-4, lr_high=1e-3,
                        shape=QUICK_SHAPE)
    return Settings(args.pretrain, args.extra, args.finetune, args.eval_every, args.records, args.lr_low,
                    args.lr_high, [])


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", type=int, default=400)
    parser.add_argument("--extra", type=int, default=400)
    parser.add_argument("--finetune", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--lr-low", type=float, default=3e-4)
    parser.add_argument("--lr-high", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="toy sizes, for a smoke test")
    parser.add_argument("--json"), parser.add_argument("--out"), parser.add_argument("--plot")
    args = parser.parse_args(argv)
    s = settings(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up = upcycling(s, work)
        tuned = finetuning(s, work, up["dense_pretrain"]["weights"])
        results = {"settings": vars(s), "upcycling": up, "finetuning": tuned}
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
