"""`moe-train-compress SOURCE OUT --experts N --method M [--calibration-batches B] [key=value ...] [--json]`: a
weights file with N experts per MoE layer, pruned or merged from SOURCE's E (moe_train.serving.compress).
`moe-train-compress SOURCE OUT --task T [--min-usage U]`: the sub-network of the experts task T is routed to
(task-routed models, moe.router_input; statistics over T's tokens only).

    moe-train-compress RUN/weights.safetensors small.safetensors --experts 4 --method prune-reap
    moe-train-compress RUN/checkpoints small.safetensors --experts 6 --method merge-output-cluster \
        --calibration-batches 32
    moe-train-eval small.safetensors                       # the same validation batches as the source's run
    moe-train init.from=small.safetensors moe.num_experts=4 train.max_steps=50   # a healing fine-tune
    moe-train-convert to-hf small.safetensors small_hf     # a Mixtral with 4 experts
    moe-train-compress RUN/weights.safetensors code.safetensors --task code   # then: moe-train-eval ... --task code

SOURCE is anything moe-train-eval reads; the configuration is found the same way (the source's run config, its
model, then the overrides). Calibration: the first B micro-batches of the configured *training* stream (never the
validation batches the result is judged on), run in eval mode. OUT (NAME.safetensors, config NAME.json) carries the
source run's config with moe.num_experts = N, so moe-train-eval on it evaluates the source run's validation
batches; the sidecar also records the method and every layer's groups. OUT is never overwritten.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

from moe_train.cli_config import exit_on_config_error
from moe_train.config.schema import Config
from moe_train.evaluate import check_new_weights_path, eval_config, load_model, run_record, source_data, task_id
from moe_train.interop.hf import write_weights
from moe_train.interop.initial import WeightSource, open_source
from moe_train.serving import compress
from moe_train.serving.calibrate import calibrate
from moe_train.training.trainer import resolve_device

PROG = "moe-train-compress"


def check_request(source: WeightSource, args: argparse.Namespace) -> None:
    """Everything about the request that can be wrong, before the model is loaded."""
    moe_cfg = source.moe_cfg
    if source.model_cfg.moe_every == 0:
        raise ValueError(f"{source.path!r} is a dense model (model.moe_every=0): no experts to compress")
    if args.task is None and (args.experts is None or args.method is None):
        raise ValueError("--experts N and --method M are required (without --task)")
    if args.experts is not None:
        compress.check_target(moe_cfg.num_experts, moe_cfg.top_k, args.experts)
    if not 0 <= args.min_usage < 1:
        raise ValueError(f"--min-usage {args.min_usage}: must be a fraction in [0, 1)")
    if args.calibration_batches < 1:
        raise ValueError(f"--calibration-batches {args.calibration_batches}: must be >= 1")
    check_new_weights_path(Path(args.out), PROG)


def compress_source(source: WeightSource, cfg: Config, args: argparse.Namespace) -> tuple[dict, dict, dict]:
    """(compressed state dict, {layer: [groups]}, what was decided) of SOURCE."""
    device = resolve_device(cfg.train.device)
    model = load_model(source, cfg, device)
    data = source_data(source, cfg, say=lambda message: None)
    only_task = None if args.task is None else task_id(args.task, data.task_names)
    stats = calibrate(model, itertools.islice(iter(data.train), args.calibration_batches), device, only_task)
    if min(s.tokens for s in stats.values()) == 0:
        raise ValueError(f"--task {args.task!r}: none of its tokens in the {args.calibration_batches} calibration "
                         f"batches; use more --calibration-batches")
    method = args.method or "prune-frequency"
    experts = args.experts or compress.task_width(stats, cfg.moe.top_k, args.min_usage)
    groups = {layer: compress.layer_groups(method, layer_stats, experts) for layer, layer_stats in stats.items()}
    decided = {"method": method, "num_experts": experts,
               "task": None if only_task is None else data.task_names[only_task]}
    return compress.compress_state(model.state_dict(), groups), groups, decided


def run(args: argparse.Namespace) -> dict:
    source = open_source(args.source)
    check_request(source, args)
    cfg = eval_config(source, args.overrides)
    state, groups, decided = compress_source(source, cfg, args)
    experts = decided["num_experts"]
    summary = {**decided, "source": source.path, "from_experts": cfg.moe.num_experts,
               "calibration_batches": args.calibration_batches,
               "params_before": sum(math.prod(shape) for shape in source.shapes.values()),
               "params_after": sum(t.numel() for t in state.values()),
               "groups": {layer: [list(g.members) for g in gs] for layer, gs in groups.items()}}
    record = run_record(source, cfg)
    record["run"]["moe"]["num_experts"] = experts
    moe_cfg = dataclasses.replace(cfg.moe, num_experts=experts)
    write_weights(args.out, cfg.model, moe_cfg, state, {**record, "compression": copy.deepcopy(summary)})
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Prune or merge the experts of a trained MoE.")
    parser.add_argument("source", help="weights.safetensors, a checkpoint (step_XXXXXXXX or checkpoints/), or a "
                                       "Hugging Face Mixtral directory")
    parser.add_argument("out", help="the compressed NAME.safetensors (its config goes to NAME.json)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.source=text")
    parser.add_argument("--experts", type=int, default=None,
                        help="N experts per MoE layer (top_k <= N <= E); with --task, default: the task's usage")
    parser.add_argument("--method", choices=compress.METHODS, default=None,
                        help="how the experts are chosen; with --task, default prune-frequency")
    parser.add_argument("--task", default=None, help="extract the sub-network of this task (a name of the data's "
                                                     "tasks or its id): statistics over its tokens only")
    parser.add_argument("--min-usage", type=float, default=0.02,
                        help="--task without --experts: keep the experts that get at least this fraction of the "
                             "task's routed pairs in some layer (default 0.02)")
    parser.add_argument("--calibration-batches", type=int, default=16,
                        help="training micro-batches the statistics are measured on (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of lines of text")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    with exit_on_config_error(PROG):
        summary = run(args)
    if args.json:
        print(json.dumps(summary))
        return
    task = "" if summary["task"] is None else f" for task {summary['task']!r}"
    print(f"{args.out}: {summary['from_experts']} -> {summary['num_experts']} experts per MoE layer by "
          f"{summary['method']}{task}, {summary['params_before']:,} -> {summary['params_after']:,} parameters")
    for layer, layer_groups in summary["groups"].items():
        print(f"  {layer}: " + " ".join("+".join(map(str, g)) for g in layer_groups))


if __name__ == "__main__":
    sys.exit(main())
