"""bench/train_e2e.py end to end at toy size: three models in lockstep, report, JSON, peak-RSS subprocesses."""

from __future__ import annotations

import math

import pytest

from helpers import load_bench_script, toy_text


def load_bench():
    return load_bench_script("train_e2e")


@pytest.mark.slow
def test_train_e2e_toy_run(tmp_path):
    pytest.importorskip("transformers")
    bench = load_bench()
    out, raw = tmp_path / "report.md", tmp_path / "run.json"
    run = bench.main(["--data", str(toy_text(tmp_path / "toy.txt")), "--steps", "4", "--eval-every", "2",
                      "--d-model", "32", "--seq-len", "32", "--batch-size", "4", "--val-batches", "2",
                      "--rss-steps", "2", "--out", str(out), "--json", str(raw)])
    assert set(run["models"]) == {"ours", "hf", "dense"}
    for name, result in run["models"].items():
        assert len(result["step_seconds"]) == 4 and result["tokens_per_s"] > 0
        assert set(result["val_loss"]) == {"2", "4"}
        assert all(math.isfinite(v) for v in [*result["train_loss"], *result["val_loss"].values()]), name
        assert run["rss"][name]["peak_rss_mib"] > 0, run["rss"][name]
    assert run["models"]["dense"]["expert_shares"] is None
    for name in ("ours", "hf"):
        shares = run["models"][name]["expert_shares"]
        assert len(shares) == 4 and all(len(layer) == 8 for layer in shares)
        assert all(sum(layer) == pytest.approx(1.0) for layer in shares)
    report = out.read_text()
    for label in bench.LABELS.values():
        assert label in report
    assert "Targets:" in report and raw.stat().st_size > 0


def test_rotation_and_overrides():
    """Each model starts a step equally often; --moe overrides are typed like MoEConfig's fields."""
    bench = load_bench()
    firsts = [bench.rotated(["a", "b", "c"], step)[0] for step in range(1, 7)]
    assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]
    cfg = bench.parse_overrides(bench.MoEConfig(), "aux_loss_coef=0.02,z_loss_coef=1e-3,aux_loss_counting=all")
    assert (cfg.aux_loss_coef, cfg.z_loss_coef, cfg.aux_loss_counting) == (0.02, 1e-3, "all")
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        bench.parse_overrides(bench.MoEConfig(), "nope=1")
