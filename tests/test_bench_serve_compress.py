"""bench/serve_compress.py end to end at toy size: every part runs, the healing runs start from the compressed
model's loss, distillation's kept fraction is computed from the three runs, and the report carries every table."""

from __future__ import annotations

import math

import pytest

from helpers import load_bench_script


@pytest.mark.slow
def test_serve_compress_bench_quick(tmp_path):
    bench = load_bench_script("serve_compress")
    out = tmp_path / "report.md"
    results = bench.main(["--quick", "--corpora", "embedded", "--out", str(out)])
    embedded = results["corpora"]["embedded"]
    d = embedded["distillation"]
    dense, teacher = d["dense"]["final_val"], d["teacher"]["final_val"]
    for arm in d["arms"].values():
        assert arm["kept_fraction"] == pytest.approx((dense - arm["run"]["final_val"]) / (dense - teacher))
    arms = embedded["compression"]["arms"]
    assert len(arms) == 5  # every method at 4 experts
    for arm in arms.values():  # the healing run's step-0 evaluation is the compressed model's loss
        assert arm["healed_start"] == pytest.approx(arm["val_loss"], abs=1e-5) and math.isfinite(arm["healed_val"])
        assert arm["healed_delta"] == pytest.approx(arm["healed_val"] - embedded["compression"]["control"])
    assert set(embedded["quantization"]) == {"int8_none", "int4_none", "int8_bf16", "int4_bf16"}
    tasks = results["task_routing"]["task"]["tasks"]
    assert all(t["experts"] == 2 for t in tasks.values())  # router_input=task: top_k experts per task
    assert all(t["extracted"] == pytest.approx(t["full"], abs=0.05) for t in tasks.values())
    text = out.read_text()
    assert all(f"{i}. " in text for i in range(1, 5))
