"""`moe-train-convert`: Hugging Face directory (Mixtral both ways; dense Llama / Mistral in) <-> moe_train weights.

    moe-train-convert from-hf SRC_DIR DST.safetensors [--dtype bfloat16]
    moe-train-convert to-hf SRC.safetensors DST_DIR [--max-shard-size 5GB] [--dtype bfloat16]
    moe-train-convert to-hf RUN/checkpoints/step_00001000 DST_DIR    # a checkpoint of any layout

The weights file is NAME.safetensors (our state dict) plus NAME.json (ModelConfig and MoEConfig); see
moe_train.interop.hf. Errors print one line on stderr and exit with status 2 (no traceback: they are input errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from moe_train.cli_config import run_subcommand
from moe_train.interop.hf import load_checkpoint_weights, load_weights, save_mixtral, save_weights
from moe_train.interop.hf_dense import load_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROG = "moe-train-convert"


def from_hf(args: argparse.Namespace) -> None:
    """SRC: Mixtral, or a dense Llama / Mistral."""
    save_weights(load_hf(args.src, dtype=DTYPES.get(args.dtype)), args.dst)


def to_hf(args: argparse.Namespace) -> None:
    """SRC: a weights file, or a checkpoint directory (step_XXXXXXXX) of any parallel layout."""
    load = load_checkpoint_weights if Path(args.src).is_dir() else load_weights
    save_mixtral(load(args.src, dtype=DTYPES.get(args.dtype)), args.dst, max_shard_size=args.max_shard_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Convert between Hugging Face directories (Mixtral; "
                                                            "from-hf also Llama, Mistral) and moe_train weights.")
    commands = parser.add_subparsers(dest="command", required=True)
    src_help = {"from-hf": "Mixtral, Llama or Mistral directory (config.json + *.safetensors)",
                "to-hf": "our NAME.safetensors or a checkpoint directory"}
    dst_help = {"from-hf": "our NAME.safetensors (config written to NAME.json)", "to-hf": "Mixtral directory"}
    for name, run in (("from-hf", from_hf), ("to-hf", to_hf)):
        sub = commands.add_parser(name, help=f"{src_help[name]} -> {dst_help[name]}")
        sub.add_argument("src", help=src_help[name])
        sub.add_argument("dst", help=dst_help[name])
        sub.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                         help="parameter dtype (router stays float32); default: the stored one")
        sub.set_defaults(run=run)
    commands.choices["to-hf"].add_argument("--max-shard-size", default="5GB",
                                           help="largest safetensors shard, e.g. 5GB or 500MiB (default 5GB)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_subcommand(build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
