"""bench/moe_layer.py: --compile runs a case compiled (in its own subprocess, as the benchmark does)."""

from __future__ import annotations

import pytest

from helpers import load_bench_script


def test_compiled_case_runs_in_a_subprocess():
    bench = load_bench_script("moe_layer")
    spec = {"case": "ours_dropless_top2_gmm", "tokens": 256, "dtype": "bfloat16", "device": "cpu", "repeats": 1,
            "warmup": 1, "d_model": 64, "d_ff": 64, "compile": True}
    result = bench.run_in_subprocess(spec, timeout_s=300)
    assert "error" not in result, result
    assert result["compile"] is True and result["median_ms"] > 0 and len(result["times_ms"]) == 1


def test_compile_needs_a_warmup_step():
    bench = load_bench_script("moe_layer")
    assert bench.parse_args(["--compile"]).compile is True
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile", "--warmup", "0"])
