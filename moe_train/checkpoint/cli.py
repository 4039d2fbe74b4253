"""`moe-train-ckpt inspect DIR [--verify]`: what a checkpoint holds (step, layout, model, files and sizes).

Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from moe_train.checkpoint.manager import read_manifest, verify
from moe_train.cli_config import run_subcommand

PROG = "moe-train-ckpt"


def describe(directory: Path, manifest: dict) -> list[str]:
    layout = " ".join(f"{k} {v}" for k, v in sorted(manifest["layout"].items()))
    model, moe = manifest["config"]["model"], manifest["config"]["moe"]
    trainer = manifest["trainer"]
    tensors = manifest["tensors"]
    n_model = sum(1 for k in tensors if k.startswith("model/"))
    lines = [f"checkpoint {directory}", f"format {manifest['format']} version {manifest['version']}, "
             f"id {manifest['checkpoint_id']}",
             f"step {manifest['step']}, tokens {trainer['tokens']:,}, data loader {trainer['loader']}",
             f"layout: {layout}",
             f"model: d_model {model['d_model']}, n_layers {model['n_layers']}, moe_every {model['moe_every']}; "
             f"experts {moe['num_experts']} x d_ff {moe['d_ff']}, top_k {moe['top_k']}",
             f"tensors: {n_model} model, {len(tensors) - n_model} optimizer state"]
    total = 0
    for name, info in sorted(manifest["files"].items()):
        lines.append(f"  {name}  {info['size']:,} bytes  sha256 {info['sha256'][:16]}...")
        total += info["size"]
    lines.append(f"total {total:,} bytes in {len(manifest['files'])} files")
    return lines


def inspect(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    manifest = verify(directory) if args.verify else read_manifest(directory)
    print("\n".join(describe(directory, manifest)))
    if args.verify:
        print("verified: every file matches the manifest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect moe_train checkpoints.")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("inspect", help="print the manifest: step, layout, model, files and sizes")
    sub.add_argument("dir", help="a checkpoint directory, e.g. RUN/checkpoints/step_00001000")
    sub.add_argument("--verify", action="store_true", help="also check every file's size and SHA-256")
    sub.set_defaults(run=inspect)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return run_subcommand(build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
