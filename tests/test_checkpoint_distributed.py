"""Checkpoints across ranks (CPU, gloo): exact resume at world 2 with ep 2, and a world-2 (ep 2) checkpoint resumed
at world 1, at world 4 (dp 4, ep 2) and at world 4 with tensor parallelism (dp 2 x tp 2, ep 2) with the same global
batch and micro-batches (accumulation makes up the difference), continuing the straight run's losses."""

from __future__ import annotations

import json
import pathlib

import pytest

from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides

STEPS, HALF = 40, 20
SCHEDULE = (f"optim.decay_steps={STEPS}",)  # the same LR schedule whether a run stops half way or not


def train(rank: int, world_size: int, args: list[str], run_dir: str) -> list[float] | None:
    make_trainer(args, world_size, rank, pathlib.Path(run_dir)).train()
    if rank != 0:
        return None
    records = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def layout_args(mode: str, dp: int, ep: int, *extra: str) -> list[str]:
    return overrides(mode, dp, (f"parallel.ep={ep}", *SCHEDULE, *extra))


@pytest.fixture(scope="module")
def ep2_runs(tmp_path_factory):
    """Per mode: the straight world-2 ep-2 run, and a run directory stopped half way with a checkpoint."""
    runs = {}
    for mode in ("capacity", "dropless"):
        straight = tmp_path_factory.mktemp(f"straight_{mode}")
        losses = run_ranks(2, train, layout_args(mode, 2, 2, f"train.max_steps={STEPS}"), str(straight))[0]
        half = tmp_path_factory.mktemp(f"half_{mode}")
        run_ranks(2, train, layout_args(mode, 2, 2, f"train.max_steps={HALF}", f"checkpoint.every={HALF}"),
                  str(half))
        runs[mode] = (losses, half)
    return runs


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_resume_at_the_same_layout_is_bit_for_bit(ep2_runs, mode, tmp_path):
    straight, half = ep2_runs[mode]
    resume = f"checkpoint.resume={half / 'checkpoints' / f'step_{HALF:08d}'}"
    resumed = run_ranks(2, train, layout_args(mode, 2, 2, f"train.max_steps={STEPS}", resume), str(tmp_path))[0]
    assert resumed == straight[HALF:]


@pytest.mark.parametrize("world,dp,ep,tp", [(1, 1, 1, 1), (4, 4, 2, 1), (4, 2, 2, 2)],
                         ids=["world1", "dp4_ep2", "dp2_tp2_ep2"])
def test_resume_on_another_layout_continues_the_loss(ep2_runs, world, dp, ep, tp, tmp_path):
    straight, half = ep2_runs["capacity"]
    resume = f"checkpoint.resume={half / 'checkpoints' / f'step_{HALF:08d}'}"
    args = layout_args("capacity", dp, ep, f"train.max_steps={STEPS}", f"parallel.tp={tp}", resume)
    resumed = (train(0, 1, args, str(tmp_path)) if world == 1 else run_ranks(world, train, args, str(tmp_path))[0])
    assert resumed == pytest.approx(straight[HALF:], abs=1e-5)


def test_an_ep2_checkpoint_converts_to_hf_and_loads_whole(ep2_runs, tmp_path):
    import torch
    from transformers import MixtralForCausalLM

    from moe_train.interop.cli import main as convert
    from moe_train.interop.hf import load_checkpoint_weights

    checkpoint = ep2_runs["dropless"][1] / "checkpoints" / f"step_{HALF:08d}"
    args = layout_args("dropless", 1, 1, f"checkpoint.resume={checkpoint}")
    resumed = make_trainer(args, 1, 0, tmp_path / "run").model.eval()  # the world-1 view of the ep-2 checkpoint
    whole = load_checkpoint_weights(checkpoint)
    assert whole.state_dict().keys() == resumed.state_dict().keys()
    assert all(torch.equal(whole.state_dict()[k], v) for k, v in resumed.state_dict().items())
    assert convert(["to-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, whole(ids), atol=1e-5, rtol=1e-5)
