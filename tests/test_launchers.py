"""Both launchers run a world-2 expert-parallel job to completion on CPU, in one run directory written by rank 0."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
JOB = ["parallel.ep=2", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
       "moe.d_ff=64", "train.seq_len=64", "train.batch_size=8", "train.max_steps=4", "train.log_every=2",
       "train.eval_every=4", "train.progress=false", "data.embedded_size=200000"]
LAUNCHERS = {
    "torchrun": lambda port: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                              "-m", "moe_train.train"],
    "deepspeed": lambda port: [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                               "--module", "moe_train.train"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_launcher_runs_world2_ep_job(launcher, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = LAUNCHERS[launcher](free_port()) + JOB + [f"hydra.run.dir={run}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4] and records[-1]["val_loss"] > 0
    assert records[0]["a2a_bytes_per_step"] > 0
    assert (run / "weights.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert proc.stdout.count("done: step 4") == 1  # rank 0 prints, rank 1 does not


def test_each_torchrun_restart_attempt_gets_its_own_store_keys():
    import datetime

    import torch.distributed as dist

    from moe_train.parallel.context import LaunchEnv, restart_safe_store

    env, timeout = LaunchEnv(rank=0, world_size=2, local_rank=0), datetime.timedelta(seconds=10)
    agent = {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1"}
    assert restart_safe_store(env, timeout, {}) is None  # not under torchrun: torch's env:// rendezvous
    assert restart_safe_store(env, timeout, {**agent, "GROUP_WORLD_SIZE": "2"}) is None  # several nodes
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timeout, wait_for_workers=False)
    store = restart_safe_store(env, timeout, {**agent, "MASTER_PORT": str(port)})
    store.set("default_pg/0//rank_1", "address of attempt 1")
    assert master.get("moe_train/attempt_1/default_pg/0//rank_1") == b"address of attempt 1"
