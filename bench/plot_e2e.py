"""Plot of bench/train_e2e.py results: loss curves of the three models, and our MoE's expert shares per layer.

Separate from the benchmark so matplotlib stays optional (imported only when a plot is asked for) and a figure can
be redrawn from the JSON without training again:

    python bench/plot_e2e.py bench/results/train_e2e.json docs/img/train_e2e.png
"""

from __future__ import annotations

import json
import sys

COLORS = {"ours": "tab:blue", "hf": "tab:orange", "dense": "tab:green"}
SMOOTHING = 0.9  # EMA factor of the training-loss curves (raw per-step losses are too noisy to read)


def ema(values: list[float], alpha: float = SMOOTHING) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_losses(ax, models: dict) -> None:
    """Validation loss (markers) over the smoothed training loss (thin line) of each model, same colour."""
    for name, r in models.items():
        color = COLORS.get(name)
        ax.plot(range(1, len(r["train_loss"]) + 1), ema(r["train_loss"]), color=color, alpha=0.35, lw=1)
        steps = sorted(int(s) for s in r["val_loss"])
        ax.plot(steps, [r["val_loss"][str(s)] for s in steps], "o-", color=color, label=f"{r['label']} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("validation loss (thin: training loss, EMA 0.9)")
    val = [v for r in models.values() for v in r["val_loss"].values()]
    if val:  # the first steps' training loss (~5.5) would squash the curves that matter
        ax.set_ylim(min(ax.get_ylim()[0], min(val) - 0.05), max(val) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_shares(fig, ax, label: str, shares: list[list[float]]) -> None:
    """Layer x expert heatmap in %, each cell annotated; the colour scale is centred on uniform (100/E %)."""
    percent = [[100 * s for s in layer] for layer in shares]
    uniform = 100 / len(percent[0])
    image = ax.imshow(percent, cmap="RdBu_r", vmin=0, vmax=2 * uniform, aspect="auto")
    for i, layer in enumerate(percent):
        for e, value in enumerate(layer):
            dark = abs(value - uniform) > 0.6 * uniform  # white text on the saturated cells
            ax.text(e, i, f"{value:.1f}", ha="center", va="center", fontsize=8, color="white" if dark else "black")
    ax.set_xticks(range(len(percent[0])))
    ax.set_yticks(range(len(percent)))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{label}: share of assignments (%), uniform {uniform:.1f}%")
    fig.colorbar(image, ax=ax, label="%")


def plot(run: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # file output only, no display needed
    import matplotlib.pyplot as plt

    models = run["models"]
    moe = next((n for n in ("ours", "hf") if n in models and models[n]["expert_shares"]), None)
    fig, axes = plt.subplots(1, 2 if moe else 1, figsize=(13 if moe else 7, 4.5), squeeze=False)
    plot_losses(axes[0][0], models)
    if moe:
        plot_shares(fig, axes[0][1], models[moe]["label"], models[moe]["expert_shares"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/plot_e2e.py RESULTS.json OUT.png")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])


if __name__ == "__main__":
    main()
