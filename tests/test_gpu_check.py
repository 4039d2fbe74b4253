"""`make gpu-check` must run on offline GPU nodes that have CUDA torch but none of this project's pip dependencies:
its import chain (and the Trainer's) does without hydra-core / omegaconf / antlr4, and its Hydra-free config equals
what Hydra composes from the same preset. Its checks themselves need CUDA (`--device cpu` rehearses the harness)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from moe_train import gpu_check
from moe_train.cli_config import compose_config

BLOCK_HYDRA = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hydra", "omegaconf", "antlr4", "deepspeed", "wandb", "datasets"):
                raise ImportError(f"{name} is not installed on this node")
    sys.meta_path.insert(0, Block())
""")


def test_gpu_check_and_trainer_import_without_hydra_and_friends():
    code = BLOCK_HYDRA + "import moe_train.gpu_check, moe_train.training.trainer; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_hydra_free_config_equals_the_composed_default():
    """conf/model/tiny.yaml through the dataclasses == `moe-train` with no overrides (model, moe, train sections)."""
    ours = gpu_check.build_config({}, gpu_check.load_preset())
    composed = compose_config([])
    for section in ("model", "moe", "train", "optim", "data"):
        assert dataclasses.asdict(getattr(ours, section)) == dataclasses.asdict(getattr(composed, section)), section


def test_hydra_free_config_refuses_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown config key 'train.max_stepz'"):
        gpu_check.build_config({"train.max_stepz": 3})
    with pytest.raises(ValueError, match="train.mixed_precision='fp8'"):
        gpu_check.build_config({"train.mixed_precision": "fp8"})
