"""The trainer end to end (small shapes): loss falls on the embedded corpus and on tinyshakespeare, runs are
reproducible, metrics.jsonl has the documented fields, accumulation is exact, and the CLI's run directory,
multirun and error exits behave."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.data import embedded_documents
from moe_train.training.trainer import Trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
         "moe.num_experts=4", "moe.d_ff=64", "train.seq_len=64", "train.batch_size=8", "train.progress=false",
         "data.embedded_size=300000", "train.eval_batches=4", "optim.warmup_steps=5"]
RECORD_KEYS = {"step", "loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "drop_frac", "expert_load"}


def train(tmp_path, *overrides: str) -> list[dict]:
    cfg = compose_config([*SMALL, *overrides])
    validate_config(cfg)
    Trainer(cfg, tmp_path).train()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def unigram_entropy_nats(tokens: torch.Tensor) -> float:
    p = torch.bincount(tokens.long()).float()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def test_loss_falls_well_below_unigram_entropy_on_embedded_corpus(tmp_path):
    records = train(tmp_path, "train.max_steps=80", "train.log_every=10", "train.eval_every=80")
    steps = [r for r in records if "loss" in r]
    entropy = unigram_entropy_nats(torch.tensor(list("".join(t for _, t in embedded_documents(300000)).encode())))
    val = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert val < entropy - 0.7, (val, entropy)


def test_metrics_records_have_the_documented_fields(tmp_path):
    records = train(tmp_path, "train.max_steps=6", "train.log_every=3", "train.eval_every=6")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [3, 6] and all(RECORD_KEYS <= set(r) for r in steps)
    assert [r["step"] for r in records if "val_loss" in r] == [6]
    load = steps[-1]["expert_load"]
    assert sorted(load) == ["0", "1"] and all(math.isclose(sum(v), 1.0, rel_tol=1e-5) for v in load.values())
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in steps)


def test_same_command_twice_gives_the_same_loss_sequence(tmp_path):
    args = ("train.max_steps=8", "train.log_every=1", "train.eval_every=0", "moe.capacity_factor=1.0",
            "moe.jitter_eps=0.01")
    first = [r["loss"] for r in train(tmp_path / "a", *args)]
    second = [r["loss"] for r in train(tmp_path / "b", *args)]
    assert first == second and len(first) == 8


def test_gradient_accumulation_equals_the_full_batch(tmp_path):
    args = ("train.max_steps=3", "train.log_every=1", "train.eval_every=0", "moe.aux_loss_coef=0")
    full = [r["loss"] for r in train(tmp_path / "full", *args)]
    accum = [r["loss"] for r in train(tmp_path / "accum", *args, "train.grad_accum_steps=4")]
    assert full == pytest.approx(accum, abs=1e-5)


def test_bf16_autocast_run_trains(tmp_path):
    records = train(tmp_path, "train.max_steps=20", "train.log_every=20", "train.eval_every=0",
                    "train.mixed_precision=bf16")
    assert math.isfinite(records[-1]["loss"]) and records[-1]["loss"] < 4.5


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="needs ../shared/data/tinyshakespeare.txt")
def test_loss_falls_on_tinyshakespeare(tmp_path):
    records = train(tmp_path, "data=text", f"data.path={SHAKESPEARE}", "train.max_steps=120",
                    "train.log_every=10", "train.eval_every=120")
    steps = [r for r in records if "loss" in r]
    entropy = unigram_entropy_nats(torch.tensor(list(SHAKESPEARE.read_bytes())))
    assert steps[-1]["loss"] < steps[0]["loss"] - 1.0
    assert [r["val_loss"] for r in records if "val_loss" in r][-1] < entropy - 0.3, entropy


def test_wandb_offline_logger_writes_a_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tmp_path, "logger=wandb", "train.max_steps=2", "train.log_every=1", "train.eval_every=0")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def run_cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flags = [a for a in args if a.startswith("-")]  # Hydra wants -m before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([sys.executable, "-m", "moe_train.train", *flags, *SMALL, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_run_dir_holds_config_and_metrics(tmp_path):
    proc = run_cli("train.max_steps=2", "train.log_every=1", "train.eval_every=2", f"hydra.run.dir={tmp_path}/run",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert (run / "config.yaml").exists() and len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert "moe_every" in (run / "config.yaml").read_text() and f"outputs in {run}" in proc.stdout
    assert (run / "weights.safetensors").exists() and (run / "weights.json").exists()


def test_cli_multirun_gives_each_job_its_own_directory(tmp_path):
    proc = run_cli("-m", "moe.top_k=1,2", "train.max_steps=1", "train.eval_every=0",
                   f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for job, k in (("0", 1), ("1", 2)):
        assert (tmp_path / "sweep" / job / "metrics.jsonl").exists()
        assert f"top_k: {k}" in (tmp_path / "sweep" / job / "config.yaml").read_text()


@pytest.mark.parametrize("override,code,message", [
    ("moe.top_k=9", 2, "moe.top_k=9 must be between 1 and moe.num_experts=4"),
    ("model.d_modle=3", 1, "Key 'd_modle' not in 'ModelConfig'"),
])
def test_cli_bad_config_exits_nonzero_without_traceback(tmp_path, override, code, message):
    proc = run_cli(override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
