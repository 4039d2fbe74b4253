"""Every layout trains like one process (CPU, gloo): with the same global batch split into the same micro-batches,
the first step's gradients and 5 steps of losses equal the single-process run's."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.parallelize import gather_full
from moe_train.parallel.mesh import build_mesh
from moe_train.training.trainer import Trainer
from multiproc import run_ranks

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
         "moe.num_experts=4", "moe.d_ff=32", "train.seq_len=32", "train.batch_size=8", "train.progress=false",
         "data.embedded_size=100000", "train.eval_every=0", "train.log_every=1", "train.max_steps=5",
         "optim.warmup_steps=2", "moe.min_capacity=0"]
MICRO_BATCHES = 4  # per optimizer step, over all ranks: micro-batch size 2
MODES = {"capacity": ["moe.capacity_factor=1.0"], "dropless": ["moe.capacity_factor=-1"]}


def overrides(mode: str, dp: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [*SMALL, *MODES[mode], f"train.grad_accum_steps={MICRO_BATCHES // dp}", *extra]


def make_trainer(args: list[str], world_size: int, rank: int, run_dir: pathlib.Path) -> Trainer:
    cfg = compose_config(args)
    dims = validate_config(cfg, world_size=world_size)
    ctx = ParallelContext.single() if world_size == 1 else ParallelContext(rank, dims, build_mesh(dims, "cpu"))
    return Trainer(cfg, run_dir, ctx)


def first_step_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.compute_gradients()
    return full_grads(trainer)


def full_grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Collective: this rank's reduced gradients, gathered into the single-process shapes."""
    grads = {name: p.grad for name, p in trainer.model.named_parameters()}
    return gather_full(trainer.model, trainer.ctx, grads) if trainer.ctx.groups is not None else grads


def train_layout(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    torch.manual_seed(0)
    grads = first_step_grads(make_trainer(args, world_size, rank, pathlib.Path(run_dir) / "grads"))
    make_trainer(args, world_size, rank, pathlib.Path(run_dir) / "run").train()
    losses = None
    if rank == 0:
        lines = (pathlib.Path(run_dir) / "run" / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
    return {"grads": grads, "losses": losses}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    cache = {}

    def get(mode: str, extra: tuple[str, ...] = ()) -> dict:
        if (mode, extra) not in cache:
            cache[mode, extra] = train_layout(0, 1, overrides(mode, 1, extra), str(tmp_path_factory.mktemp(mode)))
        return cache[mode, extra]
    return get


LAYOUTS = {  # name: (world size, data-parallel size, extra overrides)
    "dp2": (2, 2, ()),
    "ep2": (2, 2, ("parallel.ep=2",)),
    "tp2": (2, 1, ("parallel.tp=2",)),
    "tp2_expert_tp": (2, 1, ("parallel.tp=2", "parallel.expert_tp=true")),
    "dp4_ep2": (4, 4, ("parallel.ep=2",)),
    "dp2_tp2": (4, 2, ("parallel.tp=2",)),
    "dp2_tp2_ep2": (4, 2, ("parallel.tp=2", "parallel.ep=2")),
}


FSDP_LAYOUTS = {name: (world, dp, ("fsdp.enabled=true", *extra)) for name, (world, dp, extra) in
                {"dp2": LAYOUTS["dp2"], "dp2_ep2": LAYOUTS["ep2"], "dp4_ep2": LAYOUTS["dp4_ep2"],
                 "dp2_tp2_ep2": LAYOUTS["dp2_tp2_ep2"]}.items()}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_equals_single_process(single_process, tmp_path, mode, layout):
    check_layout(single_process, tmp_path, mode, *LAYOUTS[layout])


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("layout", sorted(FSDP_LAYOUTS))
def test_fsdp_layout_equals_single_process(single_process, tmp_path, mode, layout):
    check_layout(single_process, tmp_path, mode, *FSDP_LAYOUTS[layout])


def check_layout(single_process, tmp_path, mode: str, world_size: int, dp: int, extra: tuple[str, ...]) -> None:
    """5 steps of losses within 1e-5, and the first step's reduced gradients, equal the single-process run's."""
    results = run_ranks(world_size, train_layout, overrides(mode, dp, extra), str(tmp_path))
    ref = single_process(mode)
    assert results[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5) and len(ref["losses"]) == 5
    for res in results:
        for name, g in ref["grads"].items():
            assert torch.allclose(res["grads"][name], g, atol=1e-6, rtol=1e-5), name


def ep_footprint(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    """Expert parameter and optimizer-state bytes on this rank, and the logged all-to-all bytes."""
    from moe_train.parallel.data_parallel import split_expert_params

    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    trainer.train()
    dense, expert = split_expert_params(trainer.model)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = trainer.optimizer.state
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines() if rank == 0 else []
    return {"dense": nbytes(dense), "expert": nbytes(expert),
            "expert_optim": nbytes(v for p in expert for v in state[p].values() if torch.is_tensor(v) and v.ndim),
            "a2a": [json.loads(line)["a2a_bytes_per_step"] for line in lines]}


def test_expert_bytes_per_rank_are_one_over_ep_and_a2a_bytes_match_the_formula(tmp_path):
    from moe_train.parallel.expert_parallel import capacity_a2a_bytes

    args = overrides("capacity", 2, ("parallel.ep=2", "train.max_steps=2"))
    single = ep_footprint(0, 1, overrides("capacity", 1, ("train.max_steps=2",)), str(tmp_path / "one"))
    ranks = run_ranks(2, ep_footprint, args, str(tmp_path / "ep2"))
    for res in ranks:
        assert res["dense"] == single["dense"]
        assert res["expert"] * 2 == single["expert"] and res["expert_optim"] * 2 == single["expert_optim"]
    # micro-batch 2 x 32 tokens, k=2, E=4, cf 1.0 -> C = 32; 2 MoE layers, 2 micro-batches per rank, D=32, fp32
    expected = capacity_a2a_bytes(2, 2, 4, 32, 32, 2, 4)
    assert ranks[0]["a2a"] == [expected, expected] and single["a2a"] == [0, 0]


def die_mid_run(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    """Rank 1 exits abruptly during step 3; rank 0 must fail fast with a collective error, not hang."""
    import os
    import time

    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    step = trainer.run_one_step

    def maybe_die(*a, **k):
        if rank == 1 and trainer.step == 2:
            os._exit(1)
        return step(*a, **k)

    trainer.run_one_step = maybe_die
    start = time.monotonic()
    try:
        trainer.train()
    except Exception as exc:  # noqa: BLE001 - the point of the test
        return {"error": exc, "seconds": time.monotonic() - start}
    return {"error": None}


def test_a_dead_rank_makes_the_others_fail_fast_with_a_clear_error(tmp_path):
    from moe_train.parallel.context import ParallelContext, collective_failure_message, is_collective_failure
    args = overrides("dropless", 2, ("parallel.ep=2", "parallel.timeout_s=30", "train.max_steps=20"))
    survivor = run_ranks(2, die_mid_run, args, str(tmp_path), may_die=frozenset({1}))[0]
    assert is_collective_failure(survivor["error"]), survivor
    assert not is_collective_failure(RuntimeError("shape mismatch")) and not is_collective_failure(ValueError("x"))
    assert survivor["seconds"] < 30
    message = collective_failure_message(survivor["error"], ParallelContext.single(), 30)
    assert "another rank exited or stopped responding" in message and "parallel.timeout_s=30" in message
