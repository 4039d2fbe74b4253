"""When does this project's MoE beat its dense twin? Validation loss of routing and balancing variants at equal
active parameters and equal steps, 3 seeds each, on tinyshakespeare and on the embedded six-domain corpus.

Setup (CPU scale). Bytes, seq 128, batch 16 (2,048 tokens per step), AdamW lr 3e-3 with 30 warm-up steps and
cosine decay to the end, float32. Model: d 128, 4 layers, 4 heads / 2 kv heads. FFNs per config (CONFIGS):
the dense twin has a SwiGLU FFN of width 512; the MoE variants run 512 active FFN features per token (8 experts of
width 256, top-2; top-1 Switch and the shared-expert variant use other splits of the same 512), and the "dense with
the MoE's total parameters" has width 2048 (8 x 256). Validation: 16 fixed batches (eval mode: dropless, and
causal token choice for expert choice), every --eval-every steps.

Every (corpus, config, seed, steps) run is one training run in this process; its result is written to
--results/<corpus>__<config>__s<seed>__<steps>.json as soon as it finishes and is not run again (resumable: stop it
any time, start it again with the same arguments). Reported per corpus and config: validation loss mean and spread
(min..max) over the seeds, its difference to the dense twin, whether it beats the dense twin by more than the
seed spread (its worst seed below the dense twin's best), the drop fraction, the min / max expert share of any layer
at the last logged step, tokens/s (median; comparable only between runs measured on an idle machine), and the
validation curves (mean over seeds) as a plot.

    python bench/quality.py                                  # all corpora x configs x 3 seeds (hours on 2 cores)
    python bench/quality.py --configs dense,top2_dropless --steps 2000    # the horizon runs
    python bench/quality.py --corpora embedded_8m --configs dense,dense_total,top2_dropless --seeds 0 --steps 2000
                                                             # the same with 8x the data: no repeated epochs
    python bench/quality.py --corpora embedded_8m --configs dense,top2_dropless --d-model 256 --steps 8000
                                                             # a wider model: every width x 2, head dim 32 kept
    python bench/quality.py --report-only --out bench/results/quality.md --plot docs/img/quality.png
    python bench/quality.py --quick                          # a minute: 2 configs, 1 seed, 20 steps, tiny shape
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from anywhere, without an installed package

from moe_train.cli_config import compose_config  # noqa: E402
from moe_train.config.schema import validate_config  # noqa: E402
from moe_train.data import build_data, embedded_documents  # noqa: E402
from moe_train.data.chat import IGNORE_INDEX  # noqa: E402
from moe_train.data.embedded import entropy_floor  # noqa: E402
from moe_train.evaluate import task_batches  # noqa: E402
from moe_train.models.params import count_parameters  # noqa: E402
from moe_train.runs import read_run  # noqa: E402
from moe_train.training.trainer import Trainer, loss_sums  # noqa: E402

SHAKESPEARE = REPO_ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CORPORA = {"shakespeare": ["data=text", f"data.path={SHAKESPEARE}"], "embedded": ["data=embedded"],
           # the embedded corpus 8x larger: 2,000 steps see 0.5 epochs instead of 4.5 (not in the default set)
           "embedded_8m": ["data=embedded", "data.embedded_size=8000000"]}
DEFAULT_CORPORA = "shakespeare,embedded"
SHAPE = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
         "moe.num_experts=8", "moe.d_ff=256", "moe.top_k=2", "moe.routed_scale=2.0", "moe.capacity_factor=-1",
         "moe.eval_capacity_factor=-1", "moe.min_capacity=0"]
QUICK_SHAPE = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "moe.d_ff=32", "model.d_ff=64",
               "data.embedded_size=200000"]
TOP2 = []  # the base MoE: 8 experts of width 256, top-2, renormalised, routed_scale 2, dropless, Switch loss 0.01
CONFIGS = {  # name: (what it is, overrides on SHAPE)
    "dense": ("dense twin: SwiGLU FFN 512 (the MoE's active width)", ["model.moe_every=0", "model.d_ff=512"]),
    "dense_total": ("dense with the MoE's total parameters: FFN 2048", ["model.moe_every=0", "model.d_ff=2048"]),
    "switch_top1": ("Switch top-1: 8 experts of width 512, raw gate, cf 1.25, jitter 0.01",
                    ["moe.top_k=1", "moe.d_ff=512", "moe.renormalize=false", "moe.routed_scale=1.0",
                     "moe.capacity_factor=1.25", "moe.jitter_eps=0.01"]),
    "top2_cf1.0": ("top-2, capacity factor 1.0", ["moe.capacity_factor=1.0"]),
    "top2_cf1.25": ("top-2, capacity factor 1.25", ["moe.capacity_factor=1.25"]),
    "top2_cf2.0": ("top-2, capacity factor 2.0", ["moe.capacity_factor=2.0"]),
    "top2_dropless": ("top-2 dropless (the tiny preset's routing)", TOP2),
    "top2_no_aux": ("top-2 dropless, no balancing loss", ["moe.aux_loss_coef=0"]),
    "top2_zloss": ("top-2 dropless + z-loss 1e-3", ["moe.z_loss_coef=0.001"]),
    "expert_choice": ("expert choice, cf 1.0 (2 experts per token on average)",
                      ["moe.router=expert_choice", "moe.capacity_factor=1.0", "moe.aux_loss_coef=0"]),
    "aux_free_bias": ("top-2 dropless, aux-loss-free bias 1e-3, no loss",
                      ["moe.bias_update_rate=0.001", "moe.aux_loss_coef=0"]),
    "sigmoid": ("top-2 dropless, sigmoid scores (+ Switch loss)", ["moe.score_func=sigmoid"]),
    "shared_expert": ("1 shared expert (256) + top-1 of 8 routed (256), raw gate x 2",
                      ["moe.num_shared_experts=1", "moe.top_k=1", "moe.renormalize=false"]),
    # not in the default set: more total parameters at the same 512 active features (the capacity probes)
    "top2_e16": ("top-2 of 16 experts of width 256, dropless", ["moe.num_experts=16"]),
    "fine_e32_top8": ("fine-grained: top-8 of 32 experts of width 64, dropless, routed_scale 8",
                      ["moe.num_experts=32", "moe.d_ff=64", "moe.top_k=8", "moe.routed_scale=8.0"]),
}
EXTRA_CONFIGS = ("top2_e16", "fine_e32_top8")
DEFAULT_CONFIGS = ",".join(name for name in CONFIGS if name not in EXTRA_CONFIGS)


BASE_WIDTH = 128  # SHAPE's d_model; --d-model scales every width from it
SCALED_KEYS = {"model.d_model", "model.d_ff", "moe.d_ff", "model.n_heads", "model.n_kv_heads"}


def scaled(overrides: list[str], d_model: int) -> list[str]:
    """`overrides` at model width d_model: d_model, every FFN width and the head counts times d_model / 128 (head
    dim 32, 2 query heads per kv head and each config's FFN widths in d_model units stay as they are)."""
    if d_model % 64:
        raise SystemExit(f"--d-model {d_model}: must be a multiple of 64 (head dim 32, 2 query heads per kv head)")
    out = []
    for item in overrides:
        key, value = item.split("=", 1)
        out.append(f"{key}={int(value) * d_model // BASE_WIDTH}" if key in SCALED_KEYS else item)
    return out


def run_overrides(corpus: str, config: str, seed: int, steps: int, eval_every: int, quick: bool,
                  d_model: int = BASE_WIDTH) -> list[str]:
    return [*CORPORA[corpus], *scaled([*SHAPE, *CONFIGS[config][1]], d_model), *(QUICK_SHAPE if quick else []),
            "train.seq_len=128", "train.batch_size=16", f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_every={eval_every}", "train.eval_batches=16", "train.log_every=10", "train.progress=false",
            "optim.warmup_steps=30", "checkpoint.every=0"]


def expert_shares(run) -> tuple[Optional[float], Optional[float]]:
    """Smallest and largest share of a layer's assignments any expert got, at the last logged step."""
    loads = next((r["expert_load"] for r in reversed(run.train) if r.get("expert_load")), None)
    if not loads:
        return None, None
    shares = [s for layer in loads.values() for s in layer]
    return min(shares), max(shares)


def train_one(overrides: list[str]) -> dict:
    cfg = compose_config(overrides)
    validate_config(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, Path(tmp))
        counts = count_parameters(trainer.model)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        extra = {"val_expert_choice": non_causal_val(trainer)} if cfg.moe.router == "expert_choice" else {}
        if cfg.data.source == "embedded":
            by_domain = val_by_domain(trainer)
            extra.update(val_by_domain=by_domain["all"], val_by_domain_late=by_domain["late"],
                         entropy_floor=entropy_floor(embedded_documents(cfg.data.embedded_size)))
        run = read_run(Path(tmp))
    evals = {r["step"]: r["val_loss"] for r in run.evals}
    drops = [r["drop_frac"] for r in run.train if "drop_frac" in r]
    speeds = [r["tokens_per_s"] for r in run.train if "tokens_per_s" in r]
    low, high = expert_shares(run)
    return {"val_loss": evals, "final_val": evals[max(evals)], "params": counts.total, "active": counts.active,
            "drop_frac": statistics.fmean(drops) if drops else 0.0, "min_share": low, "max_share": high,
            "tokens_per_s": statistics.median(speeds) if speeds else None, "seconds": seconds, **extra}


@torch.no_grad()
def non_causal_val(trainer: Trainer) -> float:
    """Validation loss with the routers left in training mode: expert choice over each validation batch, which sees
    later tokens (what a decoder cannot do when generating); the gap to the causal eval-mode loss is the leak."""
    with trainer.engine.evaluation():
        for moe in trainer.model.moe_layers():
            moe.router.train()
        loss_sum, count = loss_sums(trainer.forward_logits, trainer.data.val, trainer.device).tolist()
    return loss_sum / max(count, 1.0)


LATE = 64  # window positions from here on predict with at least 64 bytes of context


def from_position(batches: list, start: int) -> list:
    """`batches` with only the targets at window positions >= start counted (the others IGNORE_INDEX)."""
    return [(inputs, torch.cat([torch.full_like(targets[:, :start], IGNORE_INDEX), targets[:, start:]], 1), *rest)
            for inputs, targets, *rest in batches]


@torch.no_grad()
def val_by_domain(trainer: Trainer) -> dict[str, dict[str, list[float]]]:
    """{"all" | "late": {domain: [final validation loss, targets counted]}} on the embedded corpus: the same batches
    as val_loss, each target counted under the domain of the document it belongs to (a separator under the document
    it ends); "late" counts window positions >= LATE only (what the start of a window lacks is context, not capacity)."""
    cfg = trainer.cfg
    data = build_data(dataclasses.replace(cfg.data, task_of_domain=True), cfg.train.seq_len,
                      trainer.micro_batch_size, val_batches=cfg.train.eval_batches, say=lambda _: None)
    batches = {"all": list(data.val)}
    batches["late"], out = from_position(batches["all"], LATE), {"all": {}, "late": {}}
    with trainer.engine.evaluation():
        for part, task in itertools.product(out, range(len(data.task_names))):
            loss_sum, count = loss_sums(lambda inputs, _: trainer.forward_logits(inputs), task_batches(
                batches[part], task), trainer.device).tolist()  # host sync: one per domain and part, after training
            out[part][data.task_names[task]] = [loss_sum / count, count]
    return out


def result_path(results: Path, corpus: str, config: str, seed: int, steps: int, d_model: int = BASE_WIDTH) -> Path:
    width = "" if d_model == BASE_WIDTH else f"__d{d_model}"  # the d 128 runs keep their names
    return results / f"{corpus}__{config}__s{seed}{width}__{steps}.json"


def run_all(args, corpora: list[str], configs: list[str], seeds: list[int]) -> None:
    for seed in seeds:  # all configs of a seed first: an interrupted sweep still compares everything
        for corpus in corpora:
            for config in configs:
                path = result_path(args.results, corpus, config, seed, args.steps, args.d_model)
                if path.exists():
                    continue
                overrides = run_overrides(corpus, config, seed, args.steps, args.eval_every, args.quick, args.d_model)
                result = {"corpus": corpus, "config": config, "seed": seed, "steps": args.steps,
                          "d_model": args.d_model, "overrides": overrides, **train_one(overrides)}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1) + "\n")
                print(f"{corpus} {config} seed {seed}: val {result['final_val']:.4f} in {result['seconds']:.0f} s",
                      flush=True)


# -- report -----------------------------------------------------------------------------------------------------------
def load_results(results: Path, steps: int, d_model: int = BASE_WIDTH) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(results.glob(f"*__{steps}.json")):
        r = json.loads(path.read_text())
        if r.get("d_model", BASE_WIDTH) == d_model:  # runs stored before --d-model existed are d 128
            groups.setdefault((r["corpus"], r["config"]), []).append(r)
    return groups


def spread(vals: list[float]) -> dict:
    """Seeds' count, mean, min and max: what `beats` compares."""
    return {"n": len(vals), "mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}


def aggregate(runs: list[dict]) -> dict:
    def mean(key):
        return statistics.fmean(r[key] for r in runs) if all(r[key] is not None for r in runs) else None

    return {**spread([r["final_val"] for r in runs]),
            "params": runs[0]["params"], "active": runs[0]["active"], "drop_frac": mean("drop_frac"),
            "min_share": min((r["min_share"] for r in runs if r["min_share"] is not None), default=None),
            "max_share": max((r["max_share"] for r in runs if r["max_share"] is not None), default=None),
            "tokens_per_s": mean("tokens_per_s")}


def beats(row: dict, dense: Optional[dict]) -> str:
    """yes: every seed of `row` below every seed of the dense twin (the difference exceeds the seed spread)."""
    if dense is None or row is dense:
        return ""
    if min(row["n"], dense["n"]) < 2:
        return "(1 seed)"
    if row["max"] < dense["min"]:
        return "**yes**"
    return "no" if row["mean"] >= dense["mean"] else "within spread"


def paired(runs: list[dict], dense: list[dict], step: Optional[int] = None) -> Optional[tuple[float, float]]:
    """min..max over seeds of (run - the dense run with the same seed), at `step` (default: the end). Validation
    batches are the same for every run and a seed fixes the training data order, so this difference is free of the
    data-order part of the spread."""
    val = (lambda r: r["final_val"]) if step is None else (lambda r: r["val_loss"][str(step)])  # noqa: E731
    base = {r["seed"]: val(r) for r in dense}
    diffs = [val(r) - base[r["seed"]] for r in runs if r["seed"] in base]
    return (min(diffs), max(diffs)) if len(diffs) >= 2 else None


def table(groups: dict, corpus: str) -> list[str]:
    rows = {config: aggregate(runs) for (c, config), runs in groups.items() if c == corpus}
    dense = rows.get("dense")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = [f"### {corpus}", "",
             "| config | params (active) | seeds | val loss mean | min..max | vs dense twin | beats it "
             "| vs same-seed dense min..max | drop frac | min / max expert share | tokens/s |",
             "|---|---|---:|---:|---|---:|---|---|---:|---|---:|"]
    for config in [c for c in CONFIGS if c in rows]:
        r = rows[config]
        delta = "" if dense is None or r is dense else f"{r['mean'] - dense['mean']:+.4f}"
        pair = None if dense is None or r is dense else paired(groups[corpus, config], groups[corpus, "dense"])
        pair = "" if pair is None else f"{pair[0]:+.4f}..{pair[1]:+.4f}"
        share = "" if r["min_share"] is None else f"{r['min_share']:.3f} / {r['max_share']:.3f}"
        lines.append(f"| {config} | {r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {r['n']} | {r['mean']:.4f} "
                     f"| {r['min']:.4f}..{r['max']:.4f} | {delta} | {beats(r, dense)} | {pair} "
                     f"| {fmt(r['drop_frac'], '.4f')} | {share} | {fmt(r['tokens_per_s'], ',.0f')} |")
    return lines + [*expert_choice_gap(groups, corpus), ""]


def expert_choice_gap(groups: dict, corpus: str) -> list[str]:
    runs = [r for r in groups.get((corpus, "expert_choice"), []) if "val_expert_choice" in r]
    if not runs:
        return []
    causal = statistics.fmean(r["final_val"] for r in runs)
    leaky = statistics.fmean(r["val_expert_choice"] for r in runs)
    return ["", f"expert_choice evaluated as it trains (each expert picks over the whole validation batch, later "
                f"tokens included): {leaky:.4f}, vs {causal:.4f} with the causal token-choice routing of eval mode "
                f"(the table's number), {leaky - causal:+.4f}."]


def eval_steps(runs: list[dict]) -> list[int]:
    """The validation steps every run logged."""
    return sorted(set.intersection(*(set(map(int, r["val_loss"])) for r in runs)))


def at_step(runs: list[dict], step: int) -> dict:
    return spread([r["val_loss"][str(step)] for r in runs])


def horizon(groups: dict, corpus: str) -> list[str]:
    """Per validation step, each config's mean difference to the dense twin, marked * where every seed is below
    every dense seed (the horizon is where the marks start and stay), + where every seed is only below the dense run
    with the same seed."""
    dense = groups.get((corpus, "dense"))
    configs = [c for c in CONFIGS if c != "dense" and (corpus, c) in groups]
    if dense is None or not configs:
        return []
    steps = eval_steps(dense + [r for c in configs for r in groups[corpus, c]])
    lines = [f"#### {corpus}: difference to the dense twin's mean validation loss by step (* = beats it: every "
             "seed below every dense seed; + = every seed below the dense run with the same seed)", "",
             "| config | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]
    for config in configs:
        cells = []
        for step in steps:
            row, base = at_step(groups[corpus, config], step), at_step(dense, step)
            pair = paired(groups[corpus, config], dense, step)
            mark = "*" if beats(row, base) == "**yes**" else "+" if pair is not None and pair[1] < 0 else ""
            cells.append(f"{row['mean'] - base['mean']:+.4f}{mark}")
        lines.append(f"| {config} | " + " | ".join(cells) + " |")
    return lines + [""]


def domain_losses(runs: list[dict], key: str) -> Optional[dict[str, float]]:
    """Mean over seeds of each domain's final validation loss under `key` (val_by_domain: every window position,
    val_by_domain_late: positions >= LATE), and "all" their token-weighted mean (None unless every run has `key`)."""
    if not all(key in r for r in runs):
        return None

    def with_all(per: dict) -> dict:
        return {**{d: loss for d, (loss, _) in per.items()},
                "all": sum(loss * n for loss, n in per.values()) / sum(n for _, n in per.values())}

    rows = [with_all(r[key]) for r in runs]
    return {d: statistics.fmean(row[d] for row in rows) for d in rows[0]}


def domain_rows(groups: dict, corpus: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(config, key): domain_losses} for the configs and keys the stored runs have, in CONFIGS order."""
    rows = {(c, key): domain_losses(groups[corpus, c], key) for c in CONFIGS if (corpus, c) in groups
            for key in ("val_by_domain", "val_by_domain_late")}
    return {k: v for k, v in rows.items() if v is not None}


def by_domain(groups: dict, corpus: str) -> list[str]:
    """The final validation loss per domain of the embedded corpus beside the generators' entropy (no model can go
    below it): where the loss left above the floor is, where the configs differ (in brackets: minus dense), and how
    much of it is the start of the window (the rows for positions >= LATE)."""
    rows = domain_rows(groups, corpus)
    if not rows:
        return []
    first = groups[corpus, next(iter(rows))[0]][0]
    counts = {d: n for d, (_, n) in first["val_by_domain"].items()}
    floor = {**first["entropy_floor"], "all": sum(first["entropy_floor"][d] * n for d, n in counts.items())
             / sum(counts.values())}  # the floor of the validation tokens' mix of domains
    domains = [*counts, "all"]
    share = {**{d: f"{n / sum(counts.values()):.0%}" for d, n in counts.items()}, "all": "100%"}
    lines = [f"#### {corpus}: final validation loss by domain (mean over seeds; in brackets: minus the dense twin)",
             "", "| | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains),
             "| share of the validation tokens | " + " | ".join(share[d] for d in domains) + " |",
             "| entropy of the generators (floor) | " + " | ".join(f"{floor[d]:.4f}" for d in domains) + " |"]
    for (config, key), row in rows.items():
        dense = rows.get(("dense", key))
        diff = (lambda d: "") if dense is None or row is dense else (lambda d: f" ({row[d] - dense[d]:+.4f})")
        seeds = len(groups[corpus, config])
        label = f"{config} ({seeds} seed{'s' if seeds > 1 else ''})"
        label += f", window positions >= {LATE}" if key == "val_by_domain_late" else ""
        lines.append(f"| {label} | " + " | ".join(f"{row[d]:.4f}{diff(d)}" for d in domains) + " |")
    return lines + [""]


def report(groups: dict, steps: int, command: str, d_model: int = BASE_WIDTH) -> str:
    corpora = [c for c in CORPORA if any(k[0] == c for k in groups)]
    width = "" if d_model == BASE_WIDTH else f", d_model {d_model} (every width below x {d_model / BASE_WIDTH:g})"
    lines = [f"## Quality at {steps} steps ({steps * 2048:,} tokens){width}", "", f"    {command}", "",
             "Configs: " + "; ".join(f"`{name}`: {what}" for name, (what, _) in CONFIGS.items()
                                     if any(k[1] == name for k in groups)), ""]
    for corpus in corpora:
        lines += table(groups, corpus) + horizon(groups, corpus) + by_domain(groups, corpus)
    return "\n".join(lines)


def figure(groups: dict):
    """A pyplot figure with one axis per corpus in `groups` (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = [c for c in CORPORA if any(k[0] == c for k in groups)]
    fig, axes = plt.subplots(1, len(corpora), figsize=(7 * len(corpora), 5), squeeze=False)
    return plt, fig, list(zip(axes[0], corpora))


def plot_bands(groups: dict, path: str) -> None:
    """Each config's seed band (min..max) and mean, minus the dense twin's mean, by step: where a band lies wholly
    below the dense band, the config beats the dense twin by more than the seed spread."""
    plt, fig, axes = figure(groups)
    for ax, corpus in axes:
        dense = groups.get((corpus, "dense"))
        if dense is None:
            continue
        for i, config in enumerate(c for c in CONFIGS if (corpus, c) in groups):
            steps = eval_steps(dense + groups[corpus, config])
            rows = [(at_step(groups[corpus, config], s), at_step(dense, s)["mean"]) for s in steps]
            color = "black" if config == "dense" else plt.get_cmap("tab10")(i % 10)
            ax.fill_between(steps, [r["min"] - b for r, b in rows], [r["max"] - b for r, b in rows], color=color,
                            alpha=0.15 if config == "dense" else 0.25, linewidth=0)
            ax.plot(steps, [r["mean"] - b for r, b in rows], color=color, label=config)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(xlabel="step", ylabel="difference (nats/byte)")
        ax.set_title(f"{corpus}: val loss minus the dense twin's mean (bands: seeds min..max)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(groups: dict, path: str) -> None:
    plt, fig, axes = figure(groups)
    for ax, corpus in axes:
        for i, config in enumerate(c for c in CONFIGS if (corpus, c) in groups):
            runs = groups[corpus, config]
            steps = eval_steps(runs)
            mean = [statistics.fmean(r["val_loss"][str(s)] for r in runs) for s in steps]
            dense = config.startswith("dense")
            ax.plot(steps, mean, label=config, linestyle="--" if dense else "-", linewidth=2.2 if dense else 1.2,
                    color=plt.get_cmap("tab20")(i))  # 13 configs: tab10 would repeat colours
        ax.set(title=f"{corpus}: validation loss (mean over seeds)", xlabel="step", ylabel="val loss (nats/byte)")
        ax.set_ylim(top=ax.get_ylim()[0] + 0.6 * (ax.get_ylim()[1] - ax.get_ylim()[0]))  # zoom on the finish
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def names(text: str, allowed, what: str) -> list[str]:
    chosen = [n for n in text.split(",") if n]
    unknown = [n for n in chosen if n not in allowed]
    if unknown:
        raise SystemExit(f"--{what}: unknown {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return chosen


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpora", default=DEFAULT_CORPORA, help=f"of {', '.join(CORPORA)}")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"of {', '.join(CONFIGS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--d-model", type=int, default=BASE_WIDTH,
                   help="model width; every FFN width and the head counts scale with it (multiple of 64)")
    p.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results" / "quality")
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--json", help="write the aggregated table as JSON here")
    p.add_argument("--plot", help="write the validation curves (PNG) here")
    p.add_argument("--bands", help="write each config's seed band minus the dense twin's mean, by step (PNG) here")
    p.add_argument("--report-only", action="store_true", help="report the stored results; train nothing")
    p.add_argument("--quick", action="store_true", help="tiny shape, 20 steps, 2 configs, 1 seed (a smoke test)")
    args = p.parse_args(argv)
    if args.quick and args.d_model != BASE_WIDTH:  # the quick shape sets its own widths
        raise SystemExit(f"--quick runs its own tiny shape; it does not take --d-model {args.d_model}")
    if args.quick:
        args.steps, args.eval_every, args.seeds = 20, 10, "0"
        args.configs = "dense,top2_dropless" if args.configs == p.get_default("configs") else args.configs
        args.corpora = "embedded" if args.corpora == p.get_default("corpora") else args.corpora
    return args


def main(argv: Optional[list[str]] = None) -> str:
    args = parse_args(argv)
    corpora, configs = names(args.corpora, CORPORA, "corpora"), names(args.configs, CONFIGS, "configs")
    if "shakespeare" in corpora and not SHAKESPEARE.is_file():
        raise SystemExit(f"--corpora shakespeare needs {SHAKESPEARE}")
    if not args.report_only:
        run_all(args, corpora, configs, [int(s) for s in args.seeds.split(",")])
    groups = {k: v for k, v in load_results(args.results, args.steps, args.d_model).items()
              if k[0] in corpora and k[1] in configs}
    command = "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(groups, args.steps, command, args.d_model)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        rows = {f"{c}/{k}": aggregate(v) for (c, k), v in groups.items()}
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot and groups:
        plot(groups, args.plot)
    if args.bands and groups:
        plot_bands(groups, args.bands)
    return text


if __name__ == "__main__":
    main()
