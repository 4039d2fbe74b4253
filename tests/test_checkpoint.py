"""Checkpoints in one process: exact resume, atomic saves, verification with fallback, no unpickling, shape checks,
pruning, and the inspect CLI. Placement arithmetic is tested on its own."""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from moe_train.checkpoint import manager
from moe_train.checkpoint.placement import Placement, flat_blocks, overlap
from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.training.trainer import Trainer

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "moe.num_experts=4", "moe.d_ff=32", "train.seq_len=32", "train.batch_size=4", "train.progress=false",
         "data.embedded_size=100000", "train.eval_every=0", "train.log_every=1", "optim.warmup_steps=3",
         "optim.decay_steps=40"]  # the same LR schedule whether a run stops at step 20 or 40


def run(run_dir: pathlib.Path, *overrides: str) -> list[float]:
    cfg = compose_config([*SMALL, *overrides])
    validate_config(cfg)
    Trainer(cfg, run_dir).train()
    return losses(run_dir)


def losses(run_dir: pathlib.Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[float]:
    return run(tmp_path_factory.mktemp("straight"), "train.max_steps=40")


@pytest.fixture
def saved(tmp_path) -> pathlib.Path:
    """A run stopped at step 20 with checkpoints at 10 and 20."""
    run(tmp_path, "train.max_steps=20", "checkpoint.every=10")
    return tmp_path


# -- pure logic -----------------------------------------------------------------------------------------------------
def test_overlap_of_regions():
    # want rows 0-1, cols 4-7; have rows 1-4, cols 0-5: the overlap is row 1, cols 4-5
    assert overlap((0, 4), (2, 4), (1, 0), (4, 6)) == ((slice(1, 2), slice(0, 2)), (slice(0, 1), slice(4, 6)))
    assert overlap((0,), (2,), (2,), (2,)) is None


def test_expert_stacks_are_chunked_by_global_expert_id():
    place = Placement(global_shape=(8, 3), offsets=(4, 0), shape=(4, 3), per_expert=True, writer=True)
    assert [c[0] for c in place.chunks()] == [(4, 0), (5, 0), (6, 0), (7, 0)]
    assert place.chunks()[1][2] == slice(3, 6)  # flat elements of local expert 1


def test_a_flat_fragment_is_stored_as_chunks_of_the_global_tensor():
    # a ZeRO partition holding elements [4, 11) of a local [4, 3] expert stack that is experts 4-7 of 8
    place = Placement(global_shape=(8, 3), offsets=(4, 0), shape=(4, 3), per_expert=True, writer=True)
    chunks = place.chunks(4, 11)
    assert [(off, shape) for off, shape, _ in chunks] == [((5, 1), (1, 2)), ((6, 0), (1, 3)), ((7, 0), (1, 2))]
    assert [flat for _, _, flat in chunks] == [slice(4, 6), slice(6, 9), slice(9, 11)]
    dense = Placement(global_shape=(4, 3), offsets=(0, 0), shape=(4, 3), per_expert=False, writer=True)
    assert [(off, shape) for off, shape, _ in dense.chunks(2, 10)] == [((0, 2), (1, 1)), ((1, 0), (2, 3)),
                                                                       ((3, 0), (1, 1))]


def test_flat_blocks_tile_any_range():
    random = torch.Generator().manual_seed(0)
    for _ in range(300):
        shape = tuple(torch.randint(1, 5, (int(torch.randint(0, 5, (1,), generator=random)),),
                                    generator=random).tolist())
        numel = math.prod(shape)
        start, stop = sorted(torch.randint(0, numel + 1, (2,), generator=random).tolist())
        values = torch.arange(numel).view(shape)
        for rows_apart in (False, True):
            seen = []
            for off, block, first, end in flat_blocks(shape, start, stop, rows_apart):
                region = values[tuple(slice(o, o + n) for o, n in zip(off, block))]
                assert region.reshape(-1).tolist() == list(range(first, end))
                assert not (rows_apart and shape and block[0] != 1)
                seen += list(range(first, end))
            assert seen == list(range(start, stop))


# -- exact resume ---------------------------------------------------------------------------------------------------
def test_resume_continues_bit_for_bit(straight, saved):
    assert (saved / "checkpoints" / "latest").read_text().strip() == "step_00000020"
    resumed = run(saved, "train.max_steps=40", "checkpoint.every=10", "checkpoint.resume=auto")
    assert resumed == straight  # the metrics file holds steps 1-20 of the first run and 21-40 of the resumed one


def test_resume_from_an_explicit_path_repeats_later_steps_exactly(straight, saved):
    resumed = run(saved, "train.max_steps=30", f"checkpoint.resume={saved / 'checkpoints' / 'step_00000010'}")
    assert resumed == straight[:30]


def test_keep_last_prunes_old_checkpoints_and_partial_saves_are_ignored(saved):
    (saved / "checkpoints" / "step_00000030.partial").mkdir()  # a save killed half way
    run(saved, "train.max_steps=40", "checkpoint.every=10", "checkpoint.keep_last=2", "checkpoint.resume=auto")
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == ["latest", "step_00000030",
                                                                         "step_00000040"]


# -- verification and fallback ------------------------------------------------------------------------------------
def flip_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: pathlib.Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def foreign_manifest(path: pathlib.Path) -> None:
    """Swap in the manifest of another checkpoint of the same shape (same sizes, another checkpoint id)."""
    other = path.parent.parent / "step_00000010" / "manifest.json"
    manifest = json.loads(other.read_text())
    manifest["step"] = 20
    (path.parent / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {"flipped byte": (flip_byte, "does not match its SHA-256"), "truncated": (truncate, "bytes, the manifest"),
          "missing": (os.remove, "is missing"), "manifest of another checkpoint": (foreign_manifest, "another run")}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_shard_is_named_and_auto_falls_back(saved, damage, capsys):
    hurt, message = DAMAGE[damage]
    hurt(saved / "checkpoints" / "step_00000020" / "rank00000.safetensors")
    with pytest.raises(manager.CheckpointError, match=message):
        manager.verify(saved / "checkpoints" / "step_00000020")
    cfg = compose_config([*SMALL, "train.max_steps=20", "checkpoint.resume=auto"])
    trainer = Trainer(cfg, saved)
    assert trainer.step == 10
    out = capsys.readouterr().out
    assert "step_00000020 is unusable" in out and "rank00000.safetensors" in out


def test_explicit_path_to_a_damaged_checkpoint_fails(saved):
    flip_byte(saved / "checkpoints" / "step_00000010" / "rank00000.safetensors")
    cfg = compose_config([*SMALL, f"checkpoint.resume={saved / 'checkpoints' / 'step_00000010'}"])
    with pytest.raises(manager.CheckpointError, match="step_00000010/rank00000.safetensors does not match"):
        Trainer(cfg, saved)


def test_auto_with_every_checkpoint_broken_stops_instead_of_starting_over(saved):
    for step in ("step_00000010", "step_00000020"):
        truncate(saved / "checkpoints" / step / "rank00000.safetensors")
    with pytest.raises(manager.CheckpointError, match="no usable checkpoint"):
        Trainer(compose_config([*SMALL, "checkpoint.resume=auto"]), saved)


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    assert Trainer(compose_config([*SMALL, "checkpoint.resume=auto"]), tmp_path).step == 0


class Payload:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(os.environ["MOE_TRAIN_PWNED"]),))


def test_loading_never_unpickles(saved, tmp_path, monkeypatch):
    """A crafted pickle in place of a manifest, beside the shards, and as a `.pt` file: nothing runs it."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MOE_TRAIN_PWNED", str(marker))
    evil = pickle.dumps(Payload())
    good = saved / "checkpoints" / "step_00000020"
    for name in ("optimizer.pt", "rank00000.pkl", ".metadata"):
        (good / name).write_bytes(evil)
    (saved / "checkpoints" / "step_00000010" / "manifest.json").write_bytes(evil)
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, lambda *a, **k: pytest.fail("checkpoint loading unpickled something"))
    trainer = Trainer(compose_config([*SMALL, "train.max_steps=20", "checkpoint.resume=auto"]), saved)
    assert trainer.step == 20
    with pytest.raises(manager.CheckpointError, match="is not valid JSON"):
        manager.verify(saved / "checkpoints" / "step_00000010")
    assert not marker.exists()


# -- compatibility --------------------------------------------------------------------------------------------------
def test_changed_model_shape_is_refused_with_every_difference(saved):
    cfg = compose_config([*SMALL, "model.d_ff=96", "moe.num_experts=8", "checkpoint.resume=auto"])
    with pytest.raises(manager.CheckpointError) as info:
        Trainer(cfg, saved)
    message = str(info.value)
    assert "model.d_ff: checkpoint 64, this run 96" in message and "moe.num_experts: checkpoint 4, this run 8" in message
    assert "parameter layers.0.moe.experts.w1: checkpoint shape [4," in message


def test_changed_learning_rate_is_allowed_and_takes_effect(saved):
    trainer = Trainer(compose_config([*SMALL, "train.max_steps=40", "optim.lr=1e-4", "optim.min_lr=1e-5",
                                      "checkpoint.resume=auto"]), saved)
    assert trainer.step == 20 and trainer.scheduler.get_last_lr()[0] < 1e-4


# -- inspect --------------------------------------------------------------------------------------------------------
def test_inspect_prints_step_layout_and_sizes(saved):
    out = subprocess.run([sys.executable, "-m", "moe_train.checkpoint.cli", "inspect",
                          str(saved / "checkpoints" / "step_00000020")], capture_output=True, text=True, check=True)
    assert "step 20" in out.stdout and "world_size 1" in out.stdout and "rank00000.safetensors" in out.stdout
    shutil.rmtree(saved / "checkpoints" / "step_00000020")
    bad = subprocess.run([sys.executable, "-m", "moe_train.checkpoint.cli", "inspect",
                          str(saved / "checkpoints" / "step_00000020")], capture_output=True, text=True)
    assert bad.returncode != 0 and "manifest.json is missing" in bad.stderr
