"""bench/finetune.py end to end at toy size: every arm runs, the upcycled arm starts at the dense model's loss, the
report and JSON carry every arm."""

from __future__ import annotations

import math

import pytest

from helpers import load_bench_script


@pytest.mark.slow
def test_finetune_bench_quick(tmp_path):
    bench = load_bench_script("finetune")
    out, raw = tmp_path / "report.md", tmp_path / "run.json"
    results = bench.main(["--quick", "--out", str(out), "--json", str(raw)])
    up = results["upcycling"]
    assert up["upcycled"]["step0_val"] == pytest.approx(up["dense_pretrain"]["final_val"], abs=1e-5)
    arms = results["finetuning"]
    assert {"moe_freeze_moe", "moe_freeze_non_moe", "moe_expert_dropout"} <= set(arms)
    assert sum("gap" in arm for arm in arms.values()) == 11
    assert all(math.isfinite(arm["final_val"]) for arm in [*up.values(), *arms.values()])
    assert "(a) Sparse upcycling" in out.read_text() and raw.stat().st_size > 0
