"""`moe-train-analyze SOURCE [--data embedded] [--batches B] [--out DIR] [--json] [key=value ...]`: which experts
each domain and each token class is routed to, per MoE layer, and how specialised the experts are.

    moe-train-analyze outputs/2026-11-30/10-00-00/weights.safetensors --out analysis

For every MoE layer, over the validation batches (eval mode): the share of each domain's (and each token class's)
token-expert pairs that goes to each expert, and a specialisation score, the mutual information between the
token's domain (or class) and the chosen expert, in bits, over the top-k choices: 0 = the experts are used alike by
every domain; log2(number of domains) at most. Token classes (byte tokenizer): letters, digits, whitespace,
punctuation, other. Domains: the embedded corpus's six (data.task_of_domain). Output: a table on stdout,
DIR/routing.json, DIR/routing.png (one heatmap per layer: domains and classes x experts).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from moe_train.cli_config import exit_on_config_error
from moe_train.evaluate import eval_config, load_model, source_data
from moe_train.interop.initial import open_source
from moe_train.serving.calibrate import moe_layers
from moe_train.training.trainer import resolve_device

PROG = "moe-train-analyze"
CLASSES = ("letters", "digits", "whitespace", "punctuation", "other")


def byte_classes() -> torch.Tensor:
    """[256] class index of every byte."""
    table = torch.full((256,), CLASSES.index("other"), dtype=torch.long)
    for b in range(256):
        c = chr(b)
        for name, test in (("letters", str.isalpha), ("digits", str.isdigit), ("whitespace", str.isspace)):
            if b < 128 and test(c):
                table[b] = CLASSES.index(name)
        if b < 128 and c.isprintable() and not c.isalnum() and not c.isspace():
            table[b] = CLASSES.index("punctuation")
    return table


def mutual_information(counts_GE: torch.Tensor) -> float:
    """I(group; expert) in bits of a joint count table [groups, experts]."""
    p = counts_GE.double() / counts_GE.sum().clamp_min(1)
    outer = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    nonzero = p > 0
    return float((p[nonzero] * (p[nonzero] / outer[nonzero]).log2()).sum())


def conditional_mutual_information(counts_GCE: torch.Tensor) -> float:
    """I(group; expert | condition) in bits of a joint count table [groups, conditions, experts]: the information
    about the expert the group still carries once the condition (the token class) is known."""
    total = counts_GCE.sum().clamp_min(1)
    return sum(float(counts_GCE[:, c].sum() / total) * mutual_information(counts_GCE[:, c])
               for c in range(counts_GCE.shape[1]))


@torch.no_grad()
def route_counts(model, batches, device, num_groups: dict[str, int]) -> dict[str, dict[str, torch.Tensor]]:
    """layer -> {"domains": [D, E], "classes": [C, E]} counts of top-k choices."""
    layers = moe_layers(model)
    counts = {name: {kind: torch.zeros(n, layer.cfg.num_experts, dtype=torch.long) for kind, n in num_groups.items()}
              for name, layer in layers.items()}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, route):
            ids_TK = route.ids_TK.cpu()
            for kind, group_T in current.items():
                group_TK = group_T.reshape(-1, 1).expand_as(ids_TK)
                counts[name][kind].index_put_((group_TK.reshape(-1), ids_TK.reshape(-1)),
                                              torch.ones(ids_TK.numel(), dtype=torch.long), accumulate=True)
        return hook

    handles = [layer.router.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    classes = byte_classes()
    try:
        for inputs, _, *task_ids in batches:
            current["classes"] = classes[inputs.clamp(0, 255)]
            if task_ids:
                current["domains"] = task_ids[0]
                current["domain_classes"] = task_ids[0] * len(CLASSES) + current["classes"]
            model(inputs.to(device), task_ids_BS=task_ids[0].to(device) if task_ids else None)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def layer_report(counts: dict[str, torch.Tensor], names: dict[str, tuple[str, ...]]) -> dict:
    """Per grouping: the mutual information (bits) and each group's share of its pairs per expert; for domains also
    I(domain; expert | token class)."""
    out = {}
    joint = counts.get("domain_classes")
    for kind, counts_GE in ((k, v) for k, v in counts.items() if k != "domain_classes"):
        shares = counts_GE.double() / counts_GE.sum(1, keepdim=True).clamp_min(1)
        out[kind] = {"mutual_information_bits": mutual_information(counts_GE),
                     "max_bits": math.log2(len(names[kind])),
                     "shares": {g: [round(float(v), 4) for v in shares[i]] for i, g in enumerate(names[kind])},
                     "pairs": {g: int(counts_GE[i].sum()) for i, g in enumerate(names[kind])}}
    if joint is not None and "domains" in out:
        joint_DCE = joint.view(len(names["domains"]), len(CLASSES), -1)
        out["domains"]["given_class_bits"] = conditional_mutual_information(joint_DCE)
    return out


def analyze(source_path: str, overrides: list[str], batches: int) -> dict:
    source = open_source(source_path)
    cfg = eval_config(source, ["data.source=embedded", "data.task_of_domain=true", f"train.eval_batches={batches}",
                               *overrides])
    if cfg.data.tokenizer != "byte":
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r}: token classes are defined for the byte tokenizer")
    device = resolve_device(cfg.train.device)
    model = load_model(source, cfg, device)
    data = source_data(source, cfg, say=lambda message: None)
    names = {"domains": tuple(data.task_names), "classes": CLASSES,
             "domain_classes": tuple(f"{d}/{c}" for d in data.task_names for c in CLASSES)}
    counts = route_counts(model, list(data.val), device, {k: len(v) for k, v in names.items()})
    return {"source": source_path, "layers": {layer: layer_report(c, names) for layer, c in counts.items()}}


def table(report: dict) -> str:
    lines = ["| layer | I(domain; expert) bits | of at most | I(token class; expert) bits | of at most "
             "| I(domain; expert \\| class) bits |", "|---|---:|---:|---:|---:|---:|"]
    for layer, r in report["layers"].items():
        d, c = r["domains"], r["classes"]
        lines.append(f"| {layer} | {d['mutual_information_bits']:.3f} | {d['max_bits']:.3f} | "
                     f"{c['mutual_information_bits']:.3f} | {c['max_bits']:.3f} | {d['given_class_bits']:.3f} |")
    return "\n".join(lines) + "\n"


def heatmap(report: dict, path: Path) -> None:
    from moe_train.plot import pyplot, save

    plt = pyplot()
    layers = list(report["layers"].items())
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 4.2), squeeze=False)
    for ax, (layer, r) in zip(axes[0], layers):
        rows = {**r["domains"]["shares"], **r["classes"]["shares"]}
        image = ax.imshow(list(rows.values()), aspect="auto", cmap="viridis", vmin=0)
        ax.set(title=f"{layer}\nI(domain; expert) = {r['domains']['mutual_information_bits']:.2f} bits",
               xlabel="expert", yticks=range(len(rows)), yticklabels=list(rows))
        fig.colorbar(image, ax=ax, label="share of the group's pairs")
    save(fig, path)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("source", help="weights file, checkpoint or HF directory of an MoE")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--data", default="embedded", choices=("embedded",),
                        help="the data whose domains are analysed (the embedded corpus's six)")
    parser.add_argument("--batches", type=int, default=32, help="validation micro-batches routed (default 32)")
    parser.add_argument("--out", default=None, help="write routing.json and routing.png here")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    args = parser.parse_intermixed_args(argv)
    with exit_on_config_error(PROG):
        if args.batches < 1:
            raise ValueError(f"--batches {args.batches}: must be >= 1")
        report = analyze(args.source, args.overrides, args.batches)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
        heatmap(report, out / "routing.png")
    print(json.dumps(report) if args.json else table(report), end="" if not args.json else "\n")


if __name__ == "__main__":
    sys.exit(main())
