"""Crash recovery under torchrun (CPU, gloo, world 2 with ep 2): a job killed with SIGKILL at random moments, one of
them in the middle of a save, resumes with checkpoint.resume=auto to the uninterrupted run's losses; and
`torchrun --max-restarts` with resume=auto survives a worker that crashes mid-run."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
STEPS = 60
# Many experts make the checkpoint large (~40 MB, a save of a few hundred ms) while a step stays cheap.
JOB = ["parallel.ep=2", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
       "moe.num_experts=32", "moe.d_ff=512", "train.seq_len=32", "train.batch_size=4", f"train.max_steps={STEPS}",
       "train.log_every=1", "train.eval_every=0", "train.progress=false", "data.embedded_size=100000",
       "optim.warmup_steps=3", "checkpoint.every=4", "checkpoint.keep_last=2"]


def torchrun(run: pathlib.Path, *extra: str, script: str = "-m moe_train.train") -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), *extra,
            *script.split(), *JOB, f"hydra.run.dir={run}"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}


def losses(run: pathlib.Path) -> list[float]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("straight") / "run"
    proc = subprocess.run(torchrun(run), env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run)


def kill_job(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every worker at once, as a node failure
    except ProcessLookupError:  # the job had already finished
        pass
    proc.wait()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def kill_during_save(run: pathlib.Path, proc: subprocess.Popen) -> bool:
    """Kill as soon as a save is in progress; True if the partial directory was there when the job died."""
    partial = lambda: any((run / "checkpoints").glob("step_*.partial/rank*"))  # noqa: E731
    if not wait_for(partial, proc):
        return False
    kill_job(proc)
    return partial()


def test_sigkill_at_random_moments_then_resume_auto(uninterrupted, tmp_path):
    run, rng = tmp_path / "run", random.Random(0)
    kills, during_save, history = 0, False, []
    while kills < 6:
        stderr = tmp_path / f"launch{len(history)}.err"  # read back only when a launch fails
        with open(stderr, "w") as err:
            proc = subprocess.Popen(torchrun(run, script="-m moe_train.train checkpoint.resume=auto"), env=env(),
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        if not during_save:
            during_save = kill_during_save(run, proc)
        else:
            target = len(losses(run)) + rng.randint(1, 4)
            wait_for(lambda: len(losses(run)) >= target, proc)
            time.sleep(rng.uniform(0.0, 0.3))
            kill_job(proc)
        kills += proc.returncode == -signal.SIGKILL
        history.append((proc.returncode, len(losses(run)), sorted(p.name for p in run.glob("checkpoints/step_*"))))
        assert proc.returncode in (0, -signal.SIGKILL), (history, stderr.read_text()[-3000:])
        if proc.returncode == 0:
            break
    assert kills >= 5 and during_save, history  # (return code, steps logged, checkpoint dirs) per launch
    final = subprocess.run(torchrun(run, script="-m moe_train.train checkpoint.resume=auto"), env=env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert losses(run) == uninterrupted


def test_torchrun_max_restarts_survives_a_crashing_worker(uninterrupted, tmp_path):
    run = tmp_path / "run"
    crash = {"CRASH_MARKER": str(tmp_path / "crashed"), "CRASH_AT_STEP": "11", "CRASH_RANK": "1"}
    proc = subprocess.run(torchrun(run, "--max-restarts", "1", script="tests/crash_once.py checkpoint.resume=auto"),
                          env={**env(), **crash}, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "crashed").exists() and "resumed from" in proc.stdout and "step_00000008" in proc.stdout
    assert losses(run) == uninterrupted
