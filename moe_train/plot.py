"""`moe-train-plot RUN_DIR [RUN_DIR ...] [--out DIR]`: training curves and expert load of one run, or of several
runs overlaid (run directories, or a multirun directory written by `moe-train -m ...`), as PNG files, plus a summary
table of the runs.

    moe-train-plot outputs/2026-11-30/10-00-00                  # -> outputs/.../plots/{loss,expert_load,balance}.png
    moe-train-plot multirun/2026-11-30/10-00-00                 # every job of a sweep, overlaid
    moe-train-plot runs/a runs/b --out cmp                      # several runs

Files: `loss.png` (training loss and validation loss against steps), `expert_load.png` (one heatmap per MoE layer:
experts x logged steps, colour = share of the layer's token-expert pairs; one row of layers per run), `balance.png`
(drop fraction, router entropy, and the smallest and largest expert share over all layers, against 1/E), and
`summary.md` / `summary.json` (each run's overrides, final training loss, best validation loss, median tokens/s, mean
drop fraction), printed too. Default --out: RUN_DIR/plots for one directory, ./plots for several.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from moe_train.cli_config import exit_on_config_error
from moe_train.runs import Run, find_runs, share_range, summary, summary_table

PROG = "moe-train-plot"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        ax.plot(*run.series("loss"), color=color, alpha=0.6, lw=1, label=f"{run.name} (train)")
        ax.plot(*run.series("val_loss", "evals"), "o-", color=color, ms=4, label=f"{run.name} (val)")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="training and validation loss")
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    save(fig, path)


def plot_expert_load(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    loads = [run.expert_load() for run in runs]
    cols = max((len(layers) for layers in loads), default=0)
    if cols == 0:
        return
    fig, axes = plt.subplots(len(runs), cols, figsize=(3.2 * cols, 2.6 * len(runs)), squeeze=False)
    for row, (run, layers) in enumerate(zip(runs, loads)):
        for col, (layer, (steps, shares)) in enumerate(layers.items()):
            ax = axes[row][col]
            experts = len(shares[0])
            image = ax.imshow([list(e) for e in zip(*shares)], aspect="auto", cmap="viridis", origin="lower",
                              extent=(steps[0], steps[-1], -0.5, experts - 0.5), vmin=0)
            ax.set(title=f"{run.name[:40]}: layer {layer}" if len(runs) > 1 else f"layer {layer}", xlabel="step",
                   ylabel="expert")
            fig.colorbar(image, ax=ax, label="share")
        for col in range(len(layers), cols):
            axes[row][col].axis("off")
    save(fig, path)


def plot_balance(runs: list[Run], path: Path) -> None:
    plt = pyplot()
    fig, (drop, entropy, share) = plt.subplots(1, 3, figsize=(13, 4))
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        drop.plot(*run.series("drop_frac"), color=color, label=run.name)
        entropy.plot(*run.series("router_entropy"), color=color, label=run.name)
        steps, low, high = share_range(run)
        share.plot(steps, high, color=color, label=f"{run.name} (max)")
        share.plot(steps, low, "--", color=color, label=f"{run.name} (min)")
        experts = experts_of(run)
        if experts:
            share.axhline(1.0 / experts, color="grey", lw=0.8)
    drop.set(title="dropped token-expert pairs", xlabel="step", ylabel="fraction")
    entropy.set(title="router entropy", xlabel="step", ylabel="nats per token")
    share.set(title="smallest / largest expert share (grey: 1/E)", xlabel="step", ylabel="share of pairs")
    drop.set_ylim(bottom=0, top=max(0.05, drop.get_ylim()[1]))  # dropless runs: a flat line at 0, not at mid-axis
    for ax in (drop, entropy, share):
        ax.grid(alpha=0.3)
    share.legend(fontsize=7)
    save(fig, path)


def experts_of(run: Run) -> Optional[int]:
    for row in run.train:
        for shares in (row.get("expert_load") or {}).values():
            return len(shares)
    return None


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def default_out(paths: list[str]) -> Path:
    return Path(paths[0]) / "plots" if len(paths) == 1 else Path("plots")


def plot_runs(paths: list[str], out: Optional[str] = None) -> tuple[Path, list[dict]]:
    """Write the PNGs and the summary of the runs under `paths` into `out`; (out, summary rows)."""
    runs = find_runs(paths)
    out_dir = Path(out) if out is not None else default_out(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_loss(runs, out_dir / "loss.png")
    plot_expert_load(runs, out_dir / "expert_load.png")
    plot_balance(runs, out_dir / "balance.png")
    rows = [summary(run) for run in runs]
    (out_dir / "summary.md").write_text(summary_table(rows))
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    return out_dir, rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (with metrics.jsonl) or multirun directories")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots, or ./plots)")
    args = parser.parse_args(argv)
    with exit_on_config_error(PROG):
        out_dir, rows = plot_runs(args.runs, args.out)
    print(summary_table(rows), end="")
    print(f"plots in {out_dir}: loss.png, expert_load.png, balance.png, summary.md, summary.json")


if __name__ == "__main__":
    sys.exit(main())
