"""moe-train-plan: the state arithmetic, the fake-tensor profile, the CLI's JSON contract, bad layouts rejected as
at launch, the dry run's rank roles and checkpoint coverage; predictions against measured memory (slow tier)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import load_bench_script
from moe_train.cli_config import compose_config
from moe_train.config.schema import validate_config
from moe_train.models.moe.experts import GroupedExperts, has_values
from moe_train.parallel.expert_parallel import balanced_splits, capacity_a2a_bytes
from moe_train.planner.cli import main as plan_main
from moe_train.planner.dry_run import role_ranks
from moe_train.planner.plan import plan_layout
from moe_train.planner.states import RankParams, StateLayout, state_bytes

TINY = ["train.batch_size=8", "train.seq_len=64"]
PARAMS = RankParams(dense=1000, expert=4000, largest_block=1500, largest_leaf=1200, root=300)


def test_local_engine_holds_16_bytes_per_parameter_and_foreach_adamw_one_more_copy_at_the_step():
    s = state_bytes(PARAMS, StateLayout(fused_optimizer=False), dp=4, edp=2)
    assert (s.params, s.param_bytes, s.grad_bytes, s.optimizer_bytes) == (5000, 20000, 20000, 40000)
    assert s.step_temp_bytes == 20000
    assert state_bytes(PARAMS, StateLayout(), dp=4, edp=2).step_temp_bytes == 0  # fused on CUDA


def test_zero_stages_partition_dense_over_dp_and_experts_over_edp():
    part = 1000 // 4 + 4000 // 2  # 2250
    z1 = state_bytes(PARAMS, StateLayout(zero_stage=1, reduce_bucket_size=100), dp=4, edp=2)
    z2 = state_bytes(PARAMS, StateLayout(zero_stage=2, reduce_bucket_size=100), dp=4, edp=2)
    z3 = state_bytes(PARAMS, StateLayout(zero_stage=3, reduce_bucket_size=100), dp=4, edp=2)
    assert z1.optimizer_bytes == z2.optimizer_bytes == z3.optimizer_bytes == 12 * part  # fp32 partition + m, v
    assert z1.grad_bytes == 4 * 5000 + 4 * part and z2.grad_bytes == 4 * part + 4 * 100
    assert z1.param_bytes == z2.param_bytes == 4 * 5000
    assert z3.params == part and z3.param_bytes > 4 * part  # plus the gathered leaf and prefetch bucket


def test_fsdp_shards_everything_and_gathers_units_in_the_gather_dtype():
    part = 1000 // 4 + 4000 // 2
    fp32 = state_bytes(PARAMS, StateLayout(fsdp=True), dp=4, edp=2)
    bf16 = state_bytes(PARAMS, StateLayout(fsdp=True, bf16=True), dp=4, edp=2)
    keep = state_bytes(PARAMS, StateLayout(fsdp=True, reshard_after_forward=False), dp=4, edp=2)
    assert fp32.params == part and fp32.optimizer_bytes == 8 * part
    assert fp32.param_bytes == 4 * part + 4 * (2 * 1500 + 300) and bf16.param_bytes == 4 * part + 2 * (3000 + 300)
    assert keep.param_bytes == 4 * part + 4 * 5000  # every block held from forward to backward


def test_fake_and_meta_tensors_have_no_values_and_balanced_splits_deal_rows_evenly():
    assert has_values(torch.zeros(2)) and not has_values(torch.zeros(2, device="meta"))
    with FakeTensorMode():
        assert not has_values(torch.zeros(2))
    send, counts = balanced_splits(10, 4, 2)
    assert send == [3, 3, 2, 2] and counts == [[2, 1], [2, 1], [1, 1], [1, 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_on_fake_tensors_return_the_input_shape_without_reading_group_sizes(dtype):
    with torch.device("meta"):
        experts = GroupedExperts(4, 16, 32, "swiglu").to(dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        experts.to_empty(device="cpu")  # as the planner materialises its model
        x_RD = torch.randn(13, 16, dtype=dtype)
        counts_E = torch.tensor([13, 0, 0, 0])  # a fake tensor: its values cannot be read
        assert experts(x_RD, counts_E).shape == (13, 16)
        assert experts(torch.randn(4, 5, 16, dtype=dtype), counts_E).shape == (4, 5, 16)


def plan_json(*argv: str) -> dict:
    """`moe-train-plan ... --json` in its own process: it joins a fake process group, and this test process may
    hold the session's real one (conftest.single_process_group)."""
    out = subprocess.run([sys.executable, "-m", "moe_train.planner.cli", *argv, "--json"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_cli_json_has_the_documented_keys_and_fits_follows_gpu_mem():
    out = plan_json(*TINY, "parallel.ep=2", "--world", "2", "--device", "cpu")
    assert {"params_total", "params_active", "per_rank", "a2a_bytes_per_step", "flops_per_token", "fits"} <= set(out)
    r = out["per_rank"]
    assert set(r) == {"params", "param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "total_bytes"}
    assert r["param_bytes"] + r["optimizer_bytes"] < r["total_bytes"] <= sum(v for k, v in r.items() if k != "params")
    assert out["fits"] and out["params_active"] < out["params_total"]
    small = plan_json(*TINY, "parallel.ep=2", "--world", "2", "--gpu-mem", "0.01", "--reserve", "0")
    assert not small["fits"]


def test_capacity_all_to_all_bytes_equal_the_formula():
    plan = plan_json(*TINY, "parallel.ep=2", "moe.capacity_factor=1.0", "train.grad_accum_steps=2", "--world", "2")
    # micro-batch 2 x 64 tokens, k=2, E=8, cf 1.0 -> C = 32; 4 MoE layers, 2 micro-batches, D=256, fp32
    assert plan["a2a_bytes_per_step"] == capacity_a2a_bytes(4, 2, 8, 32, 256, 2, 4)


def test_flops_per_token_is_six_active_non_embedding_params_plus_attention():
    cfg = compose_config(TINY)
    plan = plan_layout(cfg, validate_config(cfg, 1), 80.0, device=torch.device("cpu"))
    table = cfg.model.vocab_size * cfg.model.d_model  # the input embedding (untied): a lookup
    assert plan.flops_per_token == 6 * (plan.params_active - table) + 12 * 4 * 256 * 64


def test_bad_layout_is_rejected_with_the_launch_message(capsys):
    with pytest.raises(SystemExit) as exc:
        plan_main(["parallel.ep=3", "--world", "4"])
    assert exc.value.code == 2
    planned = capsys.readouterr().err
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}  # the check runs before anything connects
    launch = subprocess.run([sys.executable, "-m", "moe_train.train", "parallel.ep=3", "hydra.run.dir=/tmp/unused"],
                            capture_output=True, text=True, env=env)
    message = "parallel.ep=3 must be >= 1 and divide the data-parallel size 4"
    assert launch.returncode == 2 and message in launch.stderr and message in planned


def test_dry_run_rehearses_each_tp_ep_role_and_every_element_has_one_checkpoint_writer():
    out = plan_json(*TINY, "parallel.ep=2", "parallel.tp=2", "moe.capacity_factor=-1", "moe.eval_capacity_factor=-1",
                    "--world", "8", "--dry-run")
    roles = out["dry_run"]["roles"]
    assert [r["rank"] for r in roles] == [0, 1, 2, 3]
    assert [r["experts"] for r in roles] == ["0-3", "0-3", "4-7", "4-7"]
    assert all(r["a2a_bytes"] > 0 and r["optimizer_groups"] == 2 for r in roles)
    assert sum(r["written_params"] for r in roles) == out["params_total"]


def test_dry_run_under_fsdp_also_rehearses_the_last_replica():
    dims = validate_config(compose_config([*TINY, "parallel.ep=2"]), 8)  # dp 8, edp 4
    assert role_ranks(dims, fsdp=True) == [0, 1, 6, 7] and role_ranks(dims, fsdp=False) == [0, 1]
    out = plan_json(*TINY, "parallel.ep=2", "fsdp.enabled=true", "train.activation_checkpointing=full", "--world", "8",
                    "--dry-run")
    roles = out["dry_run"]["roles"]
    assert [r["rank"] for r in roles] == [0, 1, 6, 7] and all(r["a2a_bytes"] > 0 for r in roles)


@pytest.mark.slow
def test_mixtral_64_ranks_ep8_tp2_dry_run():
    out = plan_json("model=mixtral_8x7b", "parallel.ep=8", "parallel.tp=2", "train.seq_len=4096",
                    "train.batch_size=64", "train.mixed_precision=bf16", "--world", "64", "--dry-run")
    roles = out["dry_run"]["roles"]
    assert len(roles) == 16 and sorted({r["experts"] for r in roles}) == [f"{e}-{e}" for e in range(8)]
    assert sum(r["written_params"] for r in roles) == out["params_total"] == 46_702_792_704


@pytest.mark.slow
def test_predicted_peak_within_10_percent_of_measured_on_cpu():
    bench = load_bench_script("plan_memory")
    for name in ("1 rank, local", "2 ranks, ep 2, FSDP2, AC full", "4 ranks, ep 2 x tp 2, AC selective"):
        row = bench.run_layout(name, steps=2)
        assert 0.9 <= row["predicted"] / row["measured"] <= 1.1, row


def test_frozen_parameters_take_no_gradient_or_optimizer_bytes():
    frozen = dataclasses.replace(PARAMS, frozen_expert=3000)  # experts 4000 -> 1000 trainable
    for layout in (StateLayout(), StateLayout(zero_stage=2), StateLayout(fsdp=True)):
        full, part = state_bytes(PARAMS, layout, dp=4, edp=2), state_bytes(frozen, layout, dp=4, edp=2)
        assert part.param_bytes == full.param_bytes and part.params == full.params
        assert part.optimizer_bytes < full.optimizer_bytes and part.grad_bytes < full.grad_bytes
    local = state_bytes(frozen, StateLayout(), dp=1, edp=1)
    assert (local.grad_bytes, local.optimizer_bytes) == (4 * 2000, 8 * 2000)


def test_plan_counts_finetune_freeze():
    full = plan_json(*TINY, "--world", "1", "--device", "cpu")["per_rank"]
    frozen = plan_json(*TINY, "finetune.freeze=[experts]", "--world", "1", "--device", "cpu")["per_rank"]
    assert frozen["param_bytes"] == full["param_bytes"]
    assert frozen["optimizer_bytes"] < full["optimizer_bytes"] / 2 and frozen["grad_bytes"] < full["grad_bytes"] / 2
