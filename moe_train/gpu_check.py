"""`make gpu-check` (= `python -m moe_train.gpu_check`): is this project correct and fast on this machine's GPU?

One command for a machine with one CUDA GPU, no network, and possibly nothing of this project's dependencies but
CUDA torch (no hydra-core / omegaconf / antlr4: the config is built from the dataclasses and conf/model/tiny.yaml,
read with PyYAML, which transformers and huggingface_hub bring). About 3-4 minutes on an H100. Checks:

  train    the tiny preset (conf/model/tiny.yaml) in bf16 for 40 steps with evaluation at 20 and 40 and checkpoints
           every 10, in a child process; the trained model exported to the Mixtral layout and reloaded gives the
           same logits
  resume   the same run SIGKILLed after step 25, then `checkpoint.resume=auto` to step 40: every logged loss and
           validation loss equals the uninterrupted run's bit for bit
  no-sync  one train step (capacity and dropless, grouped experts) under torch.cuda.set_sync_debug_mode("error"):
           any blocking device-to-host transfer or synchronisation raises
  compile  the tiny preset with train.compile=true (bf16): loss against eager, step time compiled vs eager
  bench    `bench/gpu_e2e.py --quick` (our MoE, the dense twin, HF Mixtral), its table printed as it comes

Prints one table (check, result, detail); exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from moe_train.config.schema import Config, validate_config

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "conf" / "model" / "tiny.yaml"
RUN = {"train.mixed_precision": "bf16", "train.max_steps": 40, "train.eval_every": 20,
       "train.log_every": 1, "train.progress": False, "checkpoint.every": 10, "optim.decay_steps": 40}
KILL_AFTER_STEP = 25


# -- config without Hydra -------------------------------------------------------------------------------------------
def load_preset(path: Path = PRESET) -> dict[str, dict]:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise SystemExit(f"gpu-check: reading {path} needs PyYAML (pip install pyyaml): {exc}")
    return yaml.safe_load(path.read_text())


def build_config(overrides: dict[str, Any], preset: Optional[dict] = None) -> Config:
    """Config() with the preset's groups and then `overrides` ({"train.max_steps": 40}) applied, validated."""
    cfg = Config()
    flat = {f"{group}.{key}": value for group, values in (preset or {}).items() for key, value in values.items()}
    for dotted, value in {**flat, **overrides}.items():
        group, key = dotted.split(".", 1)
        section = getattr(cfg, group)
        if key not in {f.name for f in dataclasses.fields(section)}:
            raise ValueError(f"unknown config key {dotted!r}")
        setattr(section, key, value)
    validate_config(cfg)
    return cfg


# -- child processes: a training run that can be killed -------------------------------------------------------------
def child_main(run_dir: str, overrides_json: str) -> None:
    """Train in `run_dir`; the straight run also exports to the Mixtral layout and compares reloaded logits."""
    from moe_train.training.trainer import Trainer

    cfg = build_config(json.loads(overrides_json), load_preset())
    trainer = Trainer(cfg, Path(run_dir))
    trainer.train()
    if cfg.checkpoint.resume == "none" and cfg.train.max_steps == RUN["train.max_steps"]:
        export_diff = hf_roundtrip_diff(trainer, Path(run_dir) / "hf")
        (Path(run_dir) / "export.json").write_text(json.dumps({"max_abs_logit_diff": export_diff}))


@torch.no_grad()
def hf_roundtrip_diff(trainer, path: Path) -> float:
    """Export to the Mixtral layout, reload on the GPU, compare float32 logits on one validation batch."""
    from moe_train.interop.hf import load_mixtral, save_mixtral

    save_mixtral(trainer.model, path)
    reloaded = load_mixtral(path, device=trainer.device, dtype=torch.float32)
    inputs = next(iter(trainer.data.val))[0].to(trainer.device)
    trainer.model.eval()
    return (trainer.model(inputs) - reloaded(inputs)).abs().max().item()  # host sync (a check, once)


def start_child(run_dir: Path, overrides: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "moe_train.gpu_check", "--child", str(run_dir),
                             json.dumps(overrides)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_child(proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a training child behind
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}:\n{out.decode(errors='replace')[-3000:]}")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def kill_after(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL the child once metrics.jsonl shows `step` (the step-20 checkpoint is then complete)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if any(r.get("step", 0) >= step for r in records(run_dir)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    raise RuntimeError(f"the run to be killed ended (exit {proc.returncode}) before step {step}")


# -- checks ---------------------------------------------------------------------------------------------------------
def run_settings(device: str) -> dict:
    """RUN on `device`; the CPU rehearsal trains in float32 (bf16 matmuls are slow on most CPUs)."""
    return {**RUN, "train.device": device, **({} if device == "cuda" else {"train.mixed_precision": "none"})}


def check_train_and_resume(work: Path, device: str) -> list[tuple[str, bool, str]]:
    straight, killed, run = work / "straight", work / "killed", run_settings(device)
    finish_child(start_child(straight, run), "straight run")
    proc = start_child(killed, {**run, "train.max_steps": 10_000})  # same LR schedule: decay_steps is fixed
    kill_after(proc, killed, KILL_AFTER_STEP)
    finish_child(start_child(killed, {**run, "checkpoint.resume": "auto"}), "resumed run")
    a, b = records(straight), records(killed)
    val = [r["val_loss"] for r in a if "val_loss" in r]
    export = json.loads((straight / "export.json").read_text())["max_abs_logit_diff"]
    ok_train = len(val) == 2 and all(v == v for v in val) and export < 1e-4
    same = [(r["step"], r.get("loss"), r.get("val_loss")) for r in a] == \
           [(r["step"], r.get("loss"), r.get("val_loss")) for r in b]
    return [(f"train {run['train.mixed_precision']} + eval + checkpoints + HF export", ok_train,
             f"loss {a[0]['loss']:.3f} -> {[r for r in a if 'loss' in r][-1]['loss']:.3f}, val_loss "
             f"{', '.join(f'{v:.4f}' for v in val)}; export logits max diff {export:.2e}"),
            ("kill -9 after step 25, resume=auto", same,
             f"{sum('loss' in r for r in b)} logged steps {'bit-identical' if same else 'DIFFER'} to the straight run")]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_steps(trainer, steps: int) -> float:
    """Median ms of `steps` train steps (after the caller's warm-up), synchronised."""
    times = []
    for _ in range(steps):
        synchronize(trainer.device)
        start = time.perf_counter()
        trainer.train_step(collect_stats=False)
        synchronize(trainer.device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def make_trainer(work: Path, name: str, device: str, overrides: dict):
    from moe_train.training.trainer import Trainer

    cfg = build_config({**run_settings(device), "checkpoint.every": 0, "train.eval_every": 0, **overrides},
                       load_preset())
    return Trainer(cfg, work / name)


def check_no_sync(work: Path, device: str) -> list[tuple[str, bool, str]]:
    if device != "cuda":
        return [("train step without host sync", True, f"skipped: needs CUDA (device {device})")]
    rows = []
    for mode, cf in (("dropless", -1.0), ("capacity", 1.25)):
        trainer = make_trainer(work, f"sync_{mode}", device, {"moe.capacity_factor": cf, "moe.expert_impl": "grouped"})
        trainer.train_step(collect_stats=False)  # warm-up: lazy initialisation may sync once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.train_step(collect_stats=False)
            ok, detail = True, "no synchronising call"
        except RuntimeError as exc:
            ok, detail = False, str(exc).strip().splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows.append((f"train step without host sync ({mode}, grouped)", ok, detail))
    return rows


def check_compile(work: Path, device: str) -> list[tuple[str, bool, str]]:
    results = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        trainer = make_trainer(work, f"compile_{name}", device, {"train.compile": compiled})
        start = time.perf_counter()
        first = trainer.train_step(collect_stats=False)[0].item()  # host sync: the first loss, to compare
        warm = time.perf_counter() - start
        for _ in range(2):
            trainer.train_step(collect_stats=False)
        results[name] = (first, timed_steps(trainer, 10), warm)
    (l_e, ms_e, _), (l_c, ms_c, warm_c) = results["eager"], results["compiled"]
    ok = abs(l_e - l_c) < 2e-2
    return [(f"train.compile=true ({run_settings(device)['train.mixed_precision']})", ok, f"step-1 loss {l_c:.4f} vs eager {l_e:.4f}; step {ms_c:.1f} ms vs "
             f"eager {ms_e:.1f} ms ({ms_e / ms_c:.2f}x); first step incl. compile {warm_c:.0f} s")]


def check_bench(work: Path, device: str) -> list[tuple[str, bool, str]]:
    out = work / "gpu_e2e_quick.md"
    cmd = [sys.executable, str(REPO / "bench" / "gpu_e2e.py"), "--quick", "--device", device, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    print(proc.stdout, flush=True)
    ok = proc.returncode == 0 and out.exists()
    return [("bench/gpu_e2e.py --quick", ok, "table above" if ok else proc.stderr.strip()[-300:])]


CHECKS: dict[str, Callable[[Path, str], list]] = {"train": check_train_and_resume, "no-sync": check_no_sync,
                                             "compile": check_compile, "bench": check_bench}


def run_checks(names: list[str], work: Path, device: str) -> list[tuple[str, bool, str]]:
    rows = []
    for name in names:
        start = time.perf_counter()
        try:
            found = CHECKS[name](work, device)
        except Exception as exc:  # a failed check is a row, the others still run
            found = [(name, False, f"{type(exc).__name__}: {str(exc).strip()[-400:]}")]
        rows += [(check, ok, f"{detail} [{time.perf_counter() - start:.0f} s]") for check, ok, detail in found]
    return rows


def table(rows: list[tuple[str, bool, str]]) -> str:
    lines = ["| check | result | detail |", "|---|---|---|"]
    return "\n".join(lines + [f"| {c} | {'PASS' if ok else 'FAIL'} | {d} |" for c, ok, d in rows])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--work-dir", help="keep the run directories here (default: a temporary directory)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: rehearse the checks' harness on a machine without a GPU (no-sync is skipped)")
    p.add_argument("--child", nargs=2, metavar=("RUN_DIR", "OVERRIDES_JSON"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False); nothing to check")
        return 1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu-check: {name}, torch {torch.__version__}", flush=True)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    rows = run_checks([c for c in args.checks.split(",") if c], work, args.device)
    print(table(rows))
    return 0 if all(ok for _, ok, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
