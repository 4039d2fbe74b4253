"""Two nodes, rehearsed on one machine: launch/slurm.sbatch is rendered (fake `srun` and `scontrol` record what it
would run on each node), and that command is started twice, as two torchrun agents meeting through the c10d
rendezvous on localhost (torch lets one of them host the store). The 2 x 2-rank job trains with ep 2 and saves;
its checkpoint resumes on one node with 4 ranks and on 1 rank, continuing the two-node run's losses within 1e-5."""

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
STEPS, HALF = 8, 4
JOB = ["parallel.ep=2", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
       "moe.num_experts=4", "moe.d_ff=64", "train.seq_len=32", "train.batch_size=8", f"train.max_steps={STEPS}",
       "train.log_every=1", "train.eval_every=0", "train.progress=false", "data.embedded_size=100000",
       "optim.warmup_steps=2", f"optim.decay_steps={STEPS}", f"checkpoint.every={HALF}", "checkpoint.keep_last=3"]
FAKE_SLURM = {  # what a 2-node allocation's tools would answer; srun records its argument vector instead
    "srun": 'printf "%s\\0" "$@" > "$RENDERED"\n',
    "scontrol": 'echo 127.0.0.1\necho 127.0.0.2\n',  # `scontrol show hostnames`: the first node hosts the rendezvous
}


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def losses(run: pathlib.Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def render_slurm(tmp_path: pathlib.Path, port: int, run: pathlib.Path) -> list[str]:
    """The per-node command `sbatch --nodes 2 launch/slurm.sbatch JOB` hands to srun (srun's own options dropped)."""
    fake = tmp_path / "fake_slurm"
    fake.mkdir()
    for name, body in FAKE_SLURM.items():
        (fake / name).write_text("#!/usr/bin/env bash\n" + body)
        (fake / name).chmod(0o755)
    rendered = tmp_path / "rendered"
    slurm = {"SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "2",
             "MASTER_PORT": str(port), "PYTHON": sys.executable, "RENDERED": str(rendered),
             "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), *JOB, f"hydra.run.dir={run}"], env=env(**slurm),
                   check=True, timeout=60)
    argv = rendered.read_text().split("\0")[:-1]
    assert argv[0] == "--kill-on-bad-exit=1", argv
    return argv[1:]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """The rendered command, and the run directory of the two-agent job it started."""
    tmp = tmp_path_factory.mktemp("two_nodes")
    run, port = tmp / "run", free_port()
    command = render_slurm(tmp, port, run)
    agents = [subprocess.Popen(command, env=env(), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(out[-3000:] for out in outputs)
    return command, run, port


def test_slurm_script_renders_one_torchrun_agent_per_node_with_a_c10d_rendezvous(two_nodes):
    command, run, port = two_nodes
    assert command == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "4242",
                       "--max-restarts", "0", "-m", "moe_train.train", *JOB, f"hydra.run.dir={run}"]


def test_two_node_job_trains_and_saves(two_nodes):
    _, run, _ = two_nodes
    assert len(losses(run)) == STEPS
    manifest = json.loads((run / "checkpoints" / f"step_{HALF:08d}" / "manifest.json").read_text())
    assert manifest["layout"]["world_size"] == 4 and manifest["layout"]["ep"] == 2
    assert sorted(manifest["files"]) == [f"rank{r:05d}.safetensors" for r in range(4)]


@pytest.mark.parametrize("ranks", [4, 1])
def test_the_two_node_checkpoint_resumes_on_one_node(two_nodes, tmp_path, ranks):
    """4 ranks: the same layout on one node (each rank's random stream restored); 1 rank: dp 4 becomes 4
    accumulation steps of the same micro-batches, experts gathered by global id."""
    _, run, _ = two_nodes
    resumed = tmp_path / "run"
    args = [*JOB, f"checkpoint.resume={run / 'checkpoints' / f'step_{HALF:08d}'}", f"hydra.run.dir={resumed}"]
    if ranks == 1:
        args = [a for a in args if a != "parallel.ep=2"] + ["train.grad_accum_steps=4"]
        cmd = [sys.executable, "-m", "moe_train.train", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port", str(free_port()),
               "-m", "moe_train.train", *args]
    proc = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(resumed) == pytest.approx(losses(run)[HALF:], abs=1e-5)
