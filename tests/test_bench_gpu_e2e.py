"""bench/gpu_e2e.py at toy size on CPU: our MoE and dense twin through the Trainer, HF Mixtral in its plain loop."""

from __future__ import annotations

import json
import math

import pytest

from helpers import load_bench_script

TOY = ["--device", "cpu", "--quick", "--d-model", "32", "--layers", "1", "--seq-len", "32", "--batch-size", "2",
       "--vocab", "512", "--heads", "4", "--kv-heads", "2", "--moe-d-ff", "32", "--steps", "2", "--warmup", "1"]


def test_gpu_e2e_toy_cpu_run(tmp_path):
    pytest.importorskip("transformers")
    bench = load_bench_script("gpu_e2e")
    models = ["ours_eager", "dense_eager", "hf_mixtral"]
    out, raw = tmp_path / "report.md", tmp_path / "run.json"
    run = bench.main([*TOY, "--models", ",".join(models), "--out", str(out), "--json", str(raw)])
    assert list(run["results"]) == models
    for name, result in run["results"].items():
        assert "error" not in result, (name, result)
        assert result["tokens_per_s"] > 0 and len(result["step_seconds"]) == 2, name
        assert math.isfinite(result["loss"]) and result["flops_per_token"] > 0, name
        assert result["mfu"] is None and result["peak_bytes"] is None, name  # CPU: no bf16 peak, no CUDA allocator
    report = out.read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [row.split(" | ")[0][2:] for row in rows] == models
    assert "Targets:" in report and "ours_eager tokens/s >= 1.6x hf_mixtral" in report
    assert json.loads(raw.read_text())["results"]["hf_mixtral"]["tokens_per_s"] > 0


def test_targets_and_failed_rows():
    """A failed model shows its error in its row and leaves the targets that need it n/a."""
    bench = load_bench_script("gpu_e2e")
    results = {"ours_eager": {"tokens_per_s": 300.0, "peak_bytes": 10}, "hf_mixtral": {"tokens_per_s": 100.0,
                                                                                        "peak_bytes": 10},
               "ours_compiled": {"error": "RuntimeError: boom"}}
    lines = [bench.evaluate_target(t, results) for t in bench.TARGETS]
    assert lines[3].startswith("met:") and "3.00x" in lines[3]
    assert lines[4].startswith("met:") and lines[1].startswith("n/a:")
    assert "error: RuntimeError: boom" in bench.table_row("ours_compiled", results)
