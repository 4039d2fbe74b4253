"""Checkpoints under DeepSpeed ZeRO 0-3 (CPU, gloo): each rank stores the ranges of the optimizer state (under
ZeRO 3 also of the weights) that its flat partitions hold, as chunks of the global tensors. So a ZeRO run resumes
bit for bit at its own layout, and its checkpoints resume at other layouts and ZeRO stages, without DeepSpeed too."""

from __future__ import annotations

import pathlib

import pytest
import torch

from moe_train.interop.hf import load_checkpoint_weights
from multiproc import run_ranks
from test_checkpoint_distributed import train
from test_distributed_train import make_trainer, overrides

STEPS, HALF = 12, 6
SCHEDULE = (f"optim.decay_steps={STEPS}",)


def args_for(dp: int, ep: int, stage: int, *extra: str) -> list[str]:
    return overrides("capacity", dp, (f"parallel.ep={ep}", f"zero.stage={stage}", *SCHEDULE, *extra))


def checkpoint_of(run: pathlib.Path) -> str:
    return f"checkpoint.resume={run / 'checkpoints' / f'step_{HALF:08d}'}"


@pytest.fixture(scope="module")
def zero2_runs(tmp_path_factory):
    """The straight ZeRO-2 world-2 ep-2 run, and one stopped half way with a checkpoint."""
    straight = tmp_path_factory.mktemp("straight")
    losses = run_ranks(2, train, args_for(2, 2, 2, f"train.max_steps={STEPS}"), str(straight))[0]
    half = tmp_path_factory.mktemp("half")
    run_ranks(2, train, args_for(2, 2, 2, f"train.max_steps={HALF}", f"checkpoint.every={HALF}"), str(half))
    return losses, half


def test_zero2_resume_at_the_same_layout_is_bit_for_bit(zero2_runs, tmp_path):
    straight, half = zero2_runs
    resumed = run_ranks(2, train, args_for(2, 2, 2, f"train.max_steps={STEPS}", checkpoint_of(half)),
                        str(tmp_path))[0]
    assert resumed == straight[HALF:]


@pytest.mark.parametrize("world,dp,ep,stage", [(1, 1, 1, -1), (2, 2, 2, 0), (2, 2, 2, 1), (4, 4, 2, 1), (2, 2, 1, 3)],
                         ids=["world1_no_zero", "zero0_ep2", "zero1_ep2", "zero1_dp4_ep2", "zero3_dp2"])
def test_a_zero2_checkpoint_resumes_on_another_layout(zero2_runs, world, dp, ep, stage, tmp_path):
    straight, half = zero2_runs
    args = args_for(dp, ep, stage, f"train.max_steps={STEPS}", checkpoint_of(half))
    resumed = train(0, 1, args, str(tmp_path)) if world == 1 else run_ranks(world, train, args, str(tmp_path))[0]
    assert resumed == pytest.approx(straight[HALF:], abs=1e-5)


def test_a_checkpoint_with_expert_state_split_over_edp_resumes_elsewhere(zero2_runs, tmp_path):
    """dp 4 x ep 2 under ZeRO 1: each expert's optimizer state is split over its 2 expert-data-parallel ranks, and
    each writes its ranges; resumed at world 2 (ZeRO 2) the loss continues the straight run."""
    straight, _ = zero2_runs
    half = tmp_path / "half"
    run_ranks(4, train, args_for(4, 2, 1, f"train.max_steps={HALF}", f"checkpoint.every={HALF}"), str(half))
    resumed = run_ranks(2, train, args_for(2, 2, 2, f"train.max_steps={STEPS}", checkpoint_of(half)),
                        str(tmp_path / "resumed"))[0]
    assert resumed == pytest.approx(straight[HALF:], abs=1e-5)


def test_zero3_resumes_bit_for_bit_and_its_checkpoint_loads_without_deepspeed(zero2_runs, tmp_path):
    """ZeRO 3 (dp 2): weights are partitioned too, each rank stores its ranges of them."""
    straight, _ = zero2_runs
    full = run_ranks(2, train, args_for(2, 1, 3, f"train.max_steps={STEPS}"), str(tmp_path / "straight"))[0]
    assert full == pytest.approx(straight, abs=1e-5)
    half = tmp_path / "half"
    run_ranks(2, train, args_for(2, 1, 3, f"train.max_steps={HALF}", f"checkpoint.every={HALF}"), str(half))
    resumed = run_ranks(2, train, args_for(2, 1, 3, f"train.max_steps={STEPS}", checkpoint_of(half)),
                        str(tmp_path / "resumed"))[0]
    assert resumed == full[HALF:]
    alone = train(0, 1, args_for(1, 1, -1, f"train.max_steps={STEPS}", checkpoint_of(half)), str(tmp_path / "one"))
    assert alone == pytest.approx(full[HALF:], abs=1e-5)
    resumed_model = make_trainer(args_for(1, 1, -1, checkpoint_of(half)), 1, 0, tmp_path / "view").model
    whole = load_checkpoint_weights(half / "checkpoints" / f"step_{HALF:08d}")  # what to-hf converts
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in resumed_model.state_dict().items())


def test_zero3_with_expert_parallelism_resumes_bit_for_bit_and_elsewhere(zero2_runs, tmp_path):
    """ZeRO 3 at ep 2, every parameter partitioned (experts over edp): each rank stores its ranges of the weights
    and AdamW state; the run resumes bit for bit, and its checkpoint resumes at world 1 without DeepSpeed."""
    straight, _ = zero2_runs
    stage3 = ("zero.param_persistence_threshold=0",)
    full = run_ranks(2, train, args_for(2, 2, 3, f"train.max_steps={STEPS}", *stage3), str(tmp_path / "straight"))[0]
    assert full == pytest.approx(straight, abs=1e-5)
    half = tmp_path / "half"
    run_ranks(2, train, args_for(2, 2, 3, f"train.max_steps={HALF}", f"checkpoint.every={HALF}", *stage3), str(half))
    resumed = run_ranks(2, train, args_for(2, 2, 3, f"train.max_steps={STEPS}", checkpoint_of(half), *stage3),
                        str(tmp_path / "resumed"))[0]
    assert resumed == full[HALF:]
    alone = train(0, 1, args_for(1, 1, -1, f"train.max_steps={STEPS}", checkpoint_of(half)), str(tmp_path / "one"))
    assert alone == pytest.approx(full[HALF:], abs=1e-5)
