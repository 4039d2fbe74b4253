"""Config composition for the command-line tools, and the one way they report bad input (no traceback)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator, Optional

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moe_train.config.schema import Config
from moe_train.config.store import register_configs

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: list[str]) -> Config:
    """conf/config.yaml + overrides -> a validated-by-type `Config` (semantic checks are `validate_config`)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides))


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """ValueError (our checks) or a Hydra/OmegaConf compose error -> `prog: error: ...` on stderr, exit code 2."""
    try:
        yield
    except (ValueError, HydraException, OmegaConfBaseException) as exc:
        cause = f"\n  caused by: {exc.__cause__}" if exc.__cause__ is not None else ""
        print(f"{prog}: error: {exc}{cause}", file=sys.stderr)
        sys.exit(2)


def run_subcommand(parser, prog: str, argv: Optional[list[str]] = None) -> int:
    """Parse, run `args.run(args)`; an input error (ValueError, OSError) prints one line on stderr and returns 2."""
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
