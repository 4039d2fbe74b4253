"""`moe-train-eval SOURCE [key=value ...] [--json]`: validation loss, perplexity, tokens evaluated and tokens/s of
a weights file, a checkpoint or a Hugging Face directory on the configured data.

    moe-train-eval outputs/2026-11-29/21-00-00/weights.safetensors          # the run's own validation batches
    moe-train-eval RUN/checkpoints/step_00000300 train.eval_batches=50 --json
    moe-train-eval path/to/llama-dir data.source=text data.path=shakespeare.txt data.tokenizer=path/to/llama-dir

The configuration: the config of the run that wrote SOURCE when it has one (a checkpoint's manifest, or the
config.yaml beside a run's weights.safetensors), else conf/config.yaml's defaults; the model shape and routing always
from SOURCE; then the key=value overrides. By default the run's fixed validation batches are evaluated exactly as its
training did (same micro-batch size, the same train.eval_batches micro-batches: the run's layout is recorded with
its weights), so a run's final logged val_loss is reproduced from its weights. For instruction data (data.source=chat)
the loss counts response tokens only, as in training.

`tokens` = target tokens the loss counted; `tokens_per_s` = input tokens forwarded per second (forward passes only,
data loading excluded). --json prints one object with keys val_loss, perplexity, tokens, tokens_per_s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from moe_train.cli_config import compose_config, exit_on_config_error
from moe_train.config.init import init_config
from moe_train.config.schema import Config, validate_config
from moe_train.data import DataBundle, build_data
from moe_train.data.chat import IGNORE_INDEX
from moe_train.interop.initial import WeightSource, load_from_source, open_source
from moe_train.models.transformer import Transformer, build_model
from moe_train.interop.hf import write_weights
from moe_train.serving.quantize import INT4_GROUP_SIZES, MODES, check_quantization, export_state, quantize_experts
from moe_train.training.trainer import autocast_for, loss_sums, resolve_device

PROG = "moe-train-eval"


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item or "." not in key:
            raise ValueError(f"override {item!r}: {PROG} takes key=value overrides of single keys (e.g. "
                             f"data.source=chat, train.eval_batches=20), not config groups")


def eval_config(source: WeightSource, overrides: list[str]) -> Config:
    """The run's config (or the defaults), the model and MoE config of SOURCE, then the overrides; validated."""
    check_overrides(overrides)
    base = source.run_config if source.run_config is not None else dataclasses.asdict(compose_config([]))
    merged = OmegaConf.merge(OmegaConf.structured(Config), base,
                             {"model": dataclasses.asdict(source.model_cfg), "moe": dataclasses.asdict(source.moe_cfg)},
                             OmegaConf.from_dotlist(overrides))
    cfg: Config = OmegaConf.to_object(merged)
    validate_config(cfg, world_size=1)
    return cfg


def run_batches(total: int, dp: int) -> int:
    """How many global validation micro-batches a run on `dp` data-parallel ranks evaluated out of `total`."""
    return max(total - total % dp, dp)


def check_new_weights_path(path, prog: str) -> None:
    """A NAME.safetensors to create: nothing is ever overwritten."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{str(path)!r} must end in .safetensors (its config goes to NAME.json)")
    if path.exists() or path.with_suffix(".json").exists():
        raise ValueError(f"{str(path)!r} (or its .json) already exists; {prog} never overwrites, choose another")


def run_record(source: WeightSource, cfg: Config) -> dict:
    """What a weights file derived from SOURCE carries so that moe-train-eval evaluates it on the same validation
    batches: the run config and the source run's layout."""
    record = {"run": dataclasses.asdict(cfg)}
    if source.layout is not None:
        record["layout"] = source.layout
    return record


def source_dp(source: WeightSource) -> int:
    return int((source.layout or {}).get("dp", 1))


def source_data(source: WeightSource, cfg: Config, say=print) -> DataBundle:
    """cfg's data with the micro-batch size of the run that wrote SOURCE (its layout's dp)."""
    t = cfg.train
    micro = t.batch_size // (t.grad_accum_steps * source_dp(source))
    return build_data(cfg.data, t.seq_len, micro, val_batches=t.eval_batches, say=say)


def load_model(source: WeightSource, cfg: Config, device: torch.device) -> Transformer:
    """cfg's model with SOURCE's weights, in eval mode."""
    model = build_model(cfg.model, cfg.moe, device, seed=cfg.train.seed)
    load_from_source(model, source, init_config(source.path), cfg.train.seed, lambda message: None)  # said by main
    return model.eval()


def task_id(task: str, task_names: Optional[list[str]]) -> int:
    """The id of --task (a name of the data's tasks, or its index)."""
    if task_names is None:
        raise ValueError(f"--task {task!r}: the data carries no task ids (data=chat, or data.task_of_domain=true)")
    if task in task_names:
        return task_names.index(task)
    if task.isdigit() and int(task) < len(task_names):
        return int(task)
    raise ValueError(f"--task {task!r}: not one of the data's tasks {task_names} "
                     f"(or their ids 0-{len(task_names) - 1})")


def task_batches(batches: list, task: int) -> list:
    """The batches with only the targets of `task`'s tokens counted (the others IGNORE_INDEX); ValueError when
    none is left."""
    masked = [(inputs, targets.masked_fill(task_ids != task, IGNORE_INDEX), task_ids)
              for inputs, targets, task_ids in batches]
    if all(bool((targets == IGNORE_INDEX).all()) for _, targets, _ in masked):
        raise ValueError(f"--task: no token of task {task} in the {len(batches)} validation micro-batches; "
                         f"evaluate more with train.eval_batches=N")
    return masked


def measure(model: Transformer, batches: list, device: torch.device, cfg: Config) -> dict:
    """{val_loss, perplexity, tokens, tokens_per_s} of `model` on `batches` (the first one also run untimed first,
    so that one-time costs, e.g. kernel weight packing, are not counted)."""
    def forward(inputs, task_ids=None):
        return model(inputs.to(device), return_aux=True, task_ids_BS=None if task_ids is None else task_ids.to(device))

    with autocast_for(device, cfg.train.mixed_precision):
        loss_sums(forward, batches[:1], device).tolist()  # host sync: warm-up
        start = time.perf_counter()
        loss_sum, count = loss_sums(forward, batches, device).tolist()  # host sync: the end of the timed forwards
    seconds = time.perf_counter() - start
    val_loss = loss_sum / max(count, 1.0)
    return {"val_loss": val_loss, "perplexity": math.exp(val_loss) if val_loss < 700 else math.inf,
            "tokens": int(count), "tokens_per_s": sum(b[0].numel() for b in batches) / max(seconds, 1e-9)}


def evaluate(source: WeightSource, cfg: Config, say=print, quantize: Optional[str] = None, group_size: int = 32,
             save_quantized: Optional[str] = None, task: Optional[str] = None) -> dict:
    """measure() of SOURCE on cfg's validation batches (one process). With `quantize` (int8 / int4), the result is
    the model with quantized experts, plus "quantization": the unquantized model's val_loss and tokens_per_s measured
    just before, the loss delta, and the expert weights' bytes both ways; `save_quantized` writes that model (a weights
    file with the experts stored quantized). `task`: the loss counts that task's tokens only."""
    if quantize is not None:
        check_quantization(quantize, group_size)
    if save_quantized is not None:
        if quantize is None:
            raise ValueError("--save-quantized needs --quantize-experts int8|int4")
        check_new_weights_path(save_quantized, PROG)
    device = resolve_device(cfg.train.device)
    data = source_data(source, cfg, say)
    batches = list(data.val)[:run_batches(len(data.val), source_dp(source))]
    if task is not None:
        batches = task_batches(batches, task_id(task, data.task_names))
    model = load_model(source, cfg, device)
    result = measure(model, batches, device, cfg)
    if quantize is None:
        return result
    bytes_before, bytes_after = quantize_experts(model, quantize, group_size)
    if save_quantized is not None:
        tensors, quantization = export_state(model.state_dict(), model)
        write_weights(save_quantized, cfg.model, cfg.moe, tensors, {**run_record(source, cfg),
                                                                    "quantization": quantization})
    quantized = measure(model, batches, device, cfg)
    quantized["quantization"] = {
        "mode": quantize, "group_size": group_size if quantize == "int4" else None,
        "expert_bytes": bytes_after, "expert_bytes_unquantized": bytes_before,
        "val_loss_unquantized": result["val_loss"], "val_loss_delta": quantized["val_loss"] - result["val_loss"],
        "tokens_per_s_unquantized": result["tokens_per_s"]}
    return quantized


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Validation loss of a weights file, checkpoint or HF "
                                                            "directory on the configured data.")
    parser.add_argument("source", help="weights.safetensors, a checkpoint (step_XXXXXXXX or checkpoints/), or a "
                                       "Hugging Face directory (Mixtral, Llama, Mistral)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.eval_batches=20")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    parser.add_argument("--task", default=None, help="count the loss on this task's tokens only (a name of the "
                                                     "data's tasks or its id; data=chat or data.task_of_domain)")
    parser.add_argument("--quantize-experts", choices=MODES, default=None,
                        help="also evaluate with weight-only quantized routed experts (int8 per output channel, int4 "
                             "per group of input columns) and report the loss delta, bytes and speed of both")
    parser.add_argument("--group-size", type=int, default=32, help=f"int4 group size, one of {INT4_GROUP_SIZES}")
    parser.add_argument("--save-quantized", default=None, metavar="OUT.safetensors",
                        help="write the model with quantized experts (read back by every tool, dequantized)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    quiet = (lambda message: None) if args.json else print
    with exit_on_config_error(PROG):
        source = open_source(args.source)
        cfg = eval_config(source, args.overrides)
        result = evaluate(source, cfg, quiet, args.quantize_experts, args.group_size, args.save_quantized, args.task)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{source.kind} {source.path}: val_loss {result['val_loss']:.4f}, perplexity {result['perplexity']:.3f}, "
          f"{result['tokens']:,} tokens, {result['tokens_per_s']:,.0f} tokens/s")
    if "quantization" in result:
        q = result["quantization"]
        print(f"  {q['mode']} experts: {q['expert_bytes']:,} bytes (unquantized {q['expert_bytes_unquantized']:,}), "
              f"val_loss {q['val_loss_delta']:+.4f} vs {q['val_loss_unquantized']:.4f}, "
              f"{q['tokens_per_s_unquantized']:,.0f} tokens/s unquantized")


if __name__ == "__main__":
    sys.exit(main())
