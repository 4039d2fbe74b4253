"""FSDP2 with expert parallelism (`fsdp.enabled=true`, parallel/fsdp.py) on gloo: per-rank bytes are 1/dp of the
model's, bf16 gathers bf16 blocks and a float32 router, and checkpoints move between FSDP2, ZeRO and plain layouts.
(Training equality with one process, at dp2, dp2 x ep2, dp4 x ep2 and dp2 x tp2 x ep2, capacity and dropless:
tests/test_distributed_train.py::test_fsdp_layout_equals_single_process.)"""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from multiproc import run_ranks
from test_checkpoint_distributed import train
from test_distributed_train import make_trainer, overrides, train_layout

STEPS, HALF = 10, 5
# Evaluations before the saves: after a no-grad forward nothing reshards FSDP's root unit but the engine.
SCHEDULE = (f"optim.decay_steps={STEPS}", f"train.eval_every={HALF}")


def args_for(dp: int, ep: int, engine: str, *extra: str) -> list[str]:
    """engine: `fsdp`, `plain` (our own reduction) or `zeroN`."""
    chosen = {"fsdp": ("fsdp.enabled=true",), "plain": ()}.get(engine, (f"zero.stage={engine[4:]}",))
    return overrides("capacity", dp, (f"parallel.ep={ep}", *chosen, *SCHEDULE, *extra))


def checkpoint_of(run: pathlib.Path) -> str:
    return f"checkpoint.resume={run / 'checkpoints' / f'step_{HALF:08d}'}"


def run_layout(world: int, args: list[str], run_dir: pathlib.Path):
    return train(0, 1, args, str(run_dir)) if world == 1 else run_ranks(world, train, args, str(run_dir))[0]


def local_bytes(tensors) -> int:
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)


def footprint(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    """Bytes this rank holds of parameters, gradients and AdamW state (exp_avg, exp_avg_sq), after a step and a
    second backward; and one row's bytes of every parameter (the rounding of torch.chunk's rows)."""
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    trainer.train_step(collect_stats=False)
    trainer.compute_gradients()
    params = list(trainer.model.parameters())
    state = [v for p in params for v in trainer.optimizer.state[p].values() if v.dim() > 0]
    row = sum(math.prod(s.global_shape[1:]) * 4 for s in trainer.model.shard_specs.values())
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params),
            "optim": local_bytes(state), "row_bytes": row}


def test_each_rank_holds_one_over_dp_of_parameters_gradients_and_optimizer_state(tmp_path):
    """dp 4 x ep 2: dense parameters cut over 4 ranks, each rank's 2 experts over its 2 edp ranks."""
    single = footprint(0, 1, args_for(1, 1, "plain", "train.max_steps=1"), str(tmp_path / "one"))
    ranks = run_ranks(4, footprint, args_for(4, 2, "fsdp", "train.max_steps=1"), str(tmp_path / "fsdp"))
    total = single["params"] + single["grads"] + single["optim"]
    assert single["optim"] == 2 * single["params"] == 2 * single["grads"]
    for kind in ("params", "grads", "optim"):
        assert sum(r[kind] for r in ranks) == single[kind], kind  # the pieces partition the model
    for r in ranks:  # each within torch.chunk's rounding (< one row per parameter and kind) of 1/dp
        assert abs(r["params"] + r["grads"] + r["optim"] - total / 4) < 4 * r["row_bytes"], (r, total)


def record_gathered_dtypes(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    """Dtypes of the parameters as the modules see them in forward (after FSDP's all-gather), and the losses."""
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    seen = {}

    def record(key: str, param: str):
        def hook(module, args) -> None:
            seen.setdefault(key, getattr(module, param).dtype)
        return hook

    moe = trainer.model.layers[1].moe
    for key, module, param in (("router", moe.router, "weight"), ("experts", moe.experts, "w1"),
                               ("attention", trainer.model.layers[1].attention.wq, "weight")):
        module.register_forward_pre_hook(record(key, param))
    losses = [trainer.train_step(collect_stats=False)[0].item() for _ in range(3)]
    return {"seen": seen, "losses": losses, "master": trainer.model.layers[1].moe.experts.w1.dtype}


def test_bf16_gathers_bf16_blocks_and_a_float32_router_over_float32_masters(tmp_path):
    args = args_for(2, 2, "fsdp", "train.mixed_precision=bf16")
    results = run_ranks(2, record_gathered_dtypes, args, str(tmp_path / "fsdp"))
    single = record_gathered_dtypes(0, 1, args_for(1, 1, "plain", "train.mixed_precision=bf16"), str(tmp_path / "one"))
    for res in results:
        assert res["seen"] == {"router": torch.float32, "experts": torch.bfloat16, "attention": torch.bfloat16}
        assert res["master"] == torch.float32
    # One process keeps float32 weights under autocast; FSDP rounds the gathered weights to bf16 first.
    assert results[0]["losses"] == pytest.approx(single["losses"], abs=2e-2)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """The straight FSDP dp 4 x ep 2 run, and one stopped half way with a checkpoint (each rank writes its rows)."""
    straight = tmp_path_factory.mktemp("straight")
    losses = run_ranks(4, train, args_for(4, 2, "fsdp", f"train.max_steps={STEPS}"), str(straight))[0]
    half = tmp_path_factory.mktemp("half")
    run_ranks(4, train, args_for(4, 2, "fsdp", f"train.max_steps={HALF}", f"checkpoint.every={HALF}"), str(half))
    return losses, half


def test_fsdp_resume_at_the_same_layout_is_bit_for_bit(fsdp_runs, tmp_path):
    straight, half = fsdp_runs
    resumed = run_ranks(4, train, args_for(4, 2, "fsdp", f"train.max_steps={STEPS}", checkpoint_of(half)),
                        str(tmp_path))[0]
    assert resumed == straight[HALF:]


MOVES = {"plain_world1": (1, 1, 1, "plain"), "zero2_ep2": (2, 2, 2, "zero2"), "fsdp_dp2": (2, 2, 1, "fsdp")}
SLOW_MOVES = {"zero0_ep2": (2, 2, 2, "zero0"), "zero1_dp4_ep2": (4, 4, 2, "zero1"), "zero3_dp2": (2, 2, 1, "zero3"),
              "zero3_ep2": (2, 2, 2, "zero3")}


def check_move(fsdp_runs, tmp_path, world: int, dp: int, ep: int, engine: str) -> None:
    straight, half = fsdp_runs
    resumed = run_layout(world, args_for(dp, ep, engine, f"train.max_steps={STEPS}", checkpoint_of(half)), tmp_path)
    assert resumed == pytest.approx(straight[HALF:], abs=1e-5)


@pytest.mark.parametrize("move", sorted(MOVES))
def test_an_fsdp_checkpoint_resumes_on_other_layouts_and_engines(fsdp_runs, tmp_path, move):
    check_move(fsdp_runs, tmp_path, *MOVES[move])


@pytest.mark.slow
@pytest.mark.parametrize("move", sorted(SLOW_MOVES))
def test_an_fsdp_checkpoint_resumes_under_every_zero_stage(fsdp_runs, tmp_path, move):
    check_move(fsdp_runs, tmp_path, *SLOW_MOVES[move])


@pytest.mark.parametrize("engine,world,dp,ep", [("plain", 1, 1, 1), ("zero2", 2, 2, 2)], ids=["plain", "zero2"])
def test_plain_and_zero_checkpoints_resume_under_fsdp(fsdp_runs, tmp_path, engine, world, dp, ep):
    straight, _ = fsdp_runs
    half = tmp_path / "half"
    run_layout(world, args_for(dp, ep, engine, f"train.max_steps={HALF}", f"checkpoint.every={HALF}"), half)
    resumed = run_ranks(2, train, args_for(2, 2, "fsdp", f"train.max_steps={STEPS}", checkpoint_of(half)),
                        str(tmp_path / "resumed"))[0]
    assert resumed == pytest.approx(straight[HALF:], abs=1e-5)


def test_fsdp_with_zero_or_on_one_process_is_refused():
    with pytest.raises(ValueError, match=r"fsdp.enabled=true with zero.stage=2.*choose one"):
        validate_config(compose_config(["fsdp.enabled=true", "zero.stage=2"]), world_size=2)
    with pytest.raises(ValueError, match=r"fsdp.enabled=true needs a distributed launch \(world size 1\)"):
        validate_config(compose_config(["fsdp.enabled=true"]), world_size=1)


def spec_of_experts(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    spec = trainer.model.shard_specs["layers.1.moe.experts.w1"]
    return {"spec": spec, "local": tuple(trainer.model.layers[1].moe.experts.w1.to_local().shape)}


def test_fewer_local_experts_than_edp_ranks_are_cut_along_their_width(single_process_two_experts, tmp_path):
    """dp 4 x ep 2 with 2 experts: one local expert per rank and 2 edp ranks, so each holds half of its expert's
    width (dim 1) rather than one rank all of it; training still equals one process."""
    args = overrides("capacity", 4, ("parallel.ep=2", "fsdp.enabled=true", "moe.num_experts=2"))
    specs = run_ranks(4, spec_of_experts, args, str(tmp_path / "specs"))
    for rank, res in enumerate(specs):  # rank = edp_index * ep + ep_index
        edp_index, ep_index = divmod(rank, 2)
        assert res["spec"].offsets == (ep_index, 16 * edp_index, 0) and res["local"] == (1, 16, 32)
        assert res["spec"].over == ("ep", "edp")
    results = run_ranks(4, train_layout, args, str(tmp_path / "run"))
    ref = single_process_two_experts
    assert results[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    for res in results:
        for name, g in ref["grads"].items():
            assert torch.allclose(res["grads"][name], g, atol=1e-6, rtol=1e-5), name


@pytest.fixture(scope="module")
def single_process_two_experts(tmp_path_factory):
    return train_layout(0, 1, overrides("capacity", 1, ("moe.num_experts=2",)), str(tmp_path_factory.mktemp("e2")))


def test_a_checkpoint_of_experts_cut_along_their_width_resumes_at_world_1(tmp_path):
    base = ("parallel.ep=2", "moe.num_experts=2", "train.max_steps=4", "optim.decay_steps=4")
    args = overrides("capacity", 4, (*base, "fsdp.enabled=true", "checkpoint.every=2"))
    straight = run_ranks(4, train, args, str(tmp_path / "fsdp"))[0]
    resume = f"checkpoint.resume={tmp_path / 'fsdp' / 'checkpoints' / 'step_00000002'}"
    alone = train(0, 1, overrides("capacity", 1, (*base[1:], resume)), str(tmp_path / "one"))
    assert alone == pytest.approx(straight[2:], abs=1e-5)
