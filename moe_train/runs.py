"""Reading finished or running training runs back: a run directory's `metrics.jsonl` and its Hydra overrides, a
multirun directory's jobs, and one summary row per run (for `moe-train-plot`).

metrics.jsonl rows (written by moe_train.training.loggers): training rows {"step", "loss", "drop_frac",
"router_entropy", "expert_load": {layer: [share per expert]}, "tokens_per_s", ...} every train.log_every steps,
and evaluation rows {"step", "val_loss"}.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

METRICS = "metrics.jsonl"
OVERRIDES = Path(".hydra") / "overrides.yaml"


@dataclass
class Run:
    path: Path
    overrides: list[str]
    train: list[dict] = field(default_factory=list)  # rows with "loss"
    evals: list[dict] = field(default_factory=list)  # rows with "val_loss"
    shown: Optional[list[str]] = None  # the overrides that tell it from the runs it is shown with (label_runs)

    @property
    def name(self) -> str:
        """Its overrides (those that differ from the other runs shown, e.g. a sweep's swept keys), else its
        directory."""
        shown = self.overrides if self.shown is None else self.shown
        return " ".join(shown) if shown else self.path.name

    def series(self, key: str, rows: str = "train") -> tuple[list[int], list[float]]:
        """(steps, values) of `key` over the training (or evaluation) rows that have it."""
        picked = [(r["step"], r[key]) for r in getattr(self, rows) if r.get(key) is not None]
        return [s for s, _ in picked], [v for _, v in picked]

    def expert_load(self) -> dict[str, tuple[list[int], list[list[float]]]]:
        """layer -> (steps, shares [step][expert]) from the training rows that logged expert loads."""
        layers: dict[str, tuple[list[int], list[list[float]]]] = {}
        for row in self.train:
            for layer, shares in (row.get("expert_load") or {}).items():
                steps, values = layers.setdefault(layer, ([], []))
                steps.append(row["step"])
                values.append(shares)
        return dict(sorted(layers.items(), key=lambda item: int(item[0])))


def read_run(path: Path) -> Run:
    run = Run(path, read_overrides(path))
    lines = (path / METRICS).read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # a run still writing (or killed mid-write) leaves a partial last line
                break
            raise ValueError(f"{path / METRICS}: line {number} is not JSON ({err.msg})") from None
        (run.evals if "val_loss" in row else run.train).append(row)
    return run


def read_overrides(path: Path) -> list[str]:
    file = path / OVERRIDES
    if not file.is_file():
        return []
    import yaml

    return [str(item) for item in (yaml.safe_load(file.read_text()) or [])]


def find_runs(paths: list[str]) -> list[Run]:
    """Every run under `paths`: a run directory (it has metrics.jsonl) or a multirun directory (its job
    directories, in job-number order). ValueError naming a path that holds neither."""
    runs = []
    for p in map(Path, paths):
        if (p / METRICS).is_file():
            runs.append(read_run(p))
            continue
        jobs = sorted((d for d in p.iterdir() if (d / METRICS).is_file()), key=job_order) if p.is_dir() else []
        if not jobs:
            raise ValueError(f"{str(p)!r} is neither a run directory (no {METRICS}) nor a multirun directory (no "
                             f"job directory with one)")
        runs.extend(read_run(d) for d in jobs)
    return label_runs(runs)


def label_runs(runs: list[Run]) -> list[Run]:
    """Name each run by the overrides not shared by all of them (a sweep's common settings say nothing)."""
    if len(runs) > 1:
        common = set.intersection(*(set(run.overrides) for run in runs))
        for run in runs:
            run.shown = [o for o in run.overrides if o not in common]
    return runs


def job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def share_range(run: Run) -> tuple[list[int], list[float], list[float]]:
    """(steps, smallest expert share, largest expert share) over all MoE layers, per logged step."""
    steps, low, high = [], [], []
    for row in run.train:
        loads = (row.get("expert_load") or {}).values()
        if loads:
            steps.append(row["step"])
            low.append(min(min(shares) for shares in loads))
            high.append(max(max(shares) for shares in loads))
    return steps, low, high


def summary(run: Run) -> dict:
    """One row of the summary table."""
    losses, vals = run.series("loss")[1], run.series("val_loss", "evals")[1]
    speeds, drops = run.series("tokens_per_s")[1], run.series("drop_frac")[1]
    return {"run": run.name, "path": str(run.path), "overrides": run.overrides,
            "steps": run.train[-1]["step"] if run.train else 0,
            "final_loss": losses[-1] if losses else None, "best_val_loss": min(vals) if vals else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "drop_frac": statistics.fmean(drops) if drops else None}


def summary_table(rows: list[dict]) -> str:
    """Markdown, one line per run."""
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = ["| run | steps | final loss | best val loss | tokens/s | drop fraction |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['steps']} | {fmt(r['final_loss'], '.4f')} | {fmt(r['best_val_loss'], '.4f')} "
                     f"| {fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['drop_frac'], '.4f')} |")
    return "\n".join(lines) + "\n"
