"""bench/ep_e2e.py end to end at toy size: torchrun world 2 (ep 2, ZeRO 2), our MoE and DeepSpeed's in lockstep."""

from __future__ import annotations

import math

import pytest

from helpers import load_bench_script, toy_text


def load_bench():
    return load_bench_script("ep_e2e")


def test_ep_e2e_toy_run(tmp_path):
    """Both models train and evaluate with finite losses. Oracle: same initial weights, same batches and the same
    math (capacity routing, aux loss, ZeRO-2 step), so over these few steps their training and validation losses
    agree; a wrong expert slice per ep rank moves the step-1 loss by ~3e-3."""
    pytest.importorskip("deepspeed")
    bench = load_bench()
    out, raw = tmp_path / "report.md", tmp_path / "run.json"
    run = bench.main(["--data", str(toy_text(tmp_path / "toy.txt")), "--steps", "4", "--eval-every", "2",
                      "--d-model", "32", "--seq-len", "32", "--batch-size", "8", "--val-batches", "1",
                      "--rss-steps", "2", "--out", str(out), "--json", str(raw)])
    models = run["models"]
    assert set(models) == {"ours", "deepspeed"}
    for name, result in models.items():
        assert len(result["step_seconds"]) == 4 and result["tokens_per_s"] > 0
        assert set(result["val_loss"]) == {"2", "4"}
        assert all(math.isfinite(v) for v in [*result["train_loss"], *result["val_loss"].values()]), name
        assert len(run["rss"][name]) == 2 and min(run["rss"][name]) > 0
    assert models["ours"]["params_per_rank"] == models["deepspeed"]["params_per_rank"]
    assert models["ours"]["train_loss"][0] == pytest.approx(models["deepspeed"]["train_loss"][0], abs=1e-5)
    assert models["ours"]["train_loss"] == pytest.approx(models["deepspeed"]["train_loss"], abs=1e-4)
    assert models["ours"]["val_loss"] == pytest.approx(models["deepspeed"]["val_loss"], abs=1e-4)
    report = out.read_text()
    assert all(label in report for label in bench.LABELS.values())
    assert "Targets:" in report and raw.stat().st_size > 0


def test_config_matches_deepspeed_capacity_mode():
    """The routing settings DeepSpeed's MoE supports, and the batch geometry of the brief."""
    bench = load_bench()
    args = bench.parse_args(["--data", __file__])
    cfg = bench.ep_config(args)
    assert (cfg.parallel.ep, cfg.zero.stage, cfg.train.batch_size, cfg.train.max_steps) == (2, 2, 16, 300)
    m = cfg.moe
    assert (m.capacity_factor, m.eval_capacity_factor, m.min_capacity) == (1.25, 1.25, 4)
    assert (m.second_expert_policy, m.aux_loss_counting, m.drop_policy, m.router) == ("all", "first", "position",
                                                                                    "topk")
    assert cfg.train.eval_batches == 40  # 20 batches of 16 = 40 micro-batches of 8 (20 per rank)
    assert bench.ep_config(bench.parse_args(["--data", __file__, "--grad-accum", "2"])).train.eval_batches == 80
