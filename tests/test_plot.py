"""`moe-train-plot`: PNGs of one run and of a sweep's jobs overlaid (valid images of the expected size: one heatmap
per MoE layer, one row per run), the summary table from metrics.jsonl, a partial last line tolerated, bad paths
refused."""

from __future__ import annotations

import json
import pathlib

import pytest

from moe_train.plot import main
from moe_train.runs import find_runs
from test_evaluate import train_and_save
from test_distributed_train import overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT = ("train.max_steps=4", "train.eval_every=2", "train.eval_batches=2", "train.log_every=1")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> pathlib.Path:
    """A multirun directory as `moe-train -m moe.top_k=1,2` writes it: job directories 0 and 1 with overrides."""
    root = tmp_path_factory.mktemp("multirun")
    for job, top_k in enumerate((1, 2)):
        job_dir = root / str(job)
        train_and_save(0, 1, overrides("capacity", 1, (*SHORT, f"moe.top_k={top_k}")), str(job_dir))
        (job_dir / ".hydra").mkdir()
        (job_dir / ".hydra" / "overrides.yaml").write_text(f"- train.max_steps=4\n- moe.top_k={top_k}\n")
    return root


def image(path: pathlib.Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def test_one_run(sweep, capsys):
    run_dir = sweep / "0"
    main([str(run_dir)])
    out = run_dir / "plots"
    heatmaps = image(out / "expert_load.png")
    assert heatmaps.shape[:2] == (260, 640)  # 2 MoE layers of 3.2 x 2.6 inches at 100 dpi, one run
    assert heatmaps[..., :3].std() > 0.05  # drawn, not blank
    assert image(out / "loss.png").shape[:2] == (450, 800) and image(out / "balance.png").shape[:2] == (400, 1300)
    rows = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["run"] == "train.max_steps=4 moe.top_k=1" and rows[0]["steps"] == 4  # alone: all its overrides
    assert rows[0]["final_loss"] == [m for m in metrics if "loss" in m][-1]["loss"]
    assert rows[0]["best_val_loss"] == min(m["val_loss"] for m in metrics if "val_loss" in m)
    assert "| train.max_steps=4 moe.top_k=1 | 4 |" in capsys.readouterr().out


def test_a_sweep_is_overlaid_one_row_of_heatmaps_per_job(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path)])
    assert image(tmp_path / "expert_load.png").shape[:2] == (520, 640)  # 2 jobs x 2 layers
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [r["run"] for r in rows] == ["moe.top_k=1", "moe.top_k=2"]  # what differs between the jobs
    assert rows[1]["overrides"] == ["train.max_steps=4", "moe.top_k=2"]
    table = (tmp_path / "summary.md").read_text()
    assert table.count("| moe.top_k=") == 2 and table in capsys.readouterr().out


def test_a_partial_last_line_is_skipped_and_bad_paths_are_refused(sweep, tmp_path, capsys):
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    lines = (sweep / "1" / "metrics.jsonl").read_text()
    (run_dir / "metrics.jsonl").write_text(lines + '{"step": 5, "lo')  # a run still writing
    assert len(find_runs([str(run_dir)])[0].train) == 4
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nowhere")])
    assert "is neither a run directory (no metrics.jsonl) nor a multirun directory" in capsys.readouterr().err
