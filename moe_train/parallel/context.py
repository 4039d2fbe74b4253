"""The launch environment and the parallel context a run is given (rank, layout, groups).

torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from moe_train.config.parallel import ParallelDims
from moe_train.parallel.mesh import ParallelGroups, build_mesh

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int


def read_launch_env(environ=os.environ) -> LaunchEnv:
    """ValueError naming the variable when the launcher's variables are malformed or inconsistent."""
    values = {}
    for key, default in zip(ENV_KEYS, ("0", "1", "0")):
        raw = environ.get(key, default)
        if not raw.isdigit():
            raise ValueError(f"environment variable {key}={raw!r} must be a non-negative integer")
        values[key] = int(raw)
    env = LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if env.world_size < 1 or env.rank >= env.world_size:
        raise ValueError(f"RANK={env.rank} must be below WORLD_SIZE={env.world_size} (and WORLD_SIZE >= 1)")
    if env.world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise ValueError(f"WORLD_SIZE={env.world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with "
                         f"torchrun or deepspeed")
    return env


@dataclass
class ParallelContext:
    rank: int
    dims: ParallelDims
    groups: Optional[ParallelGroups]  # None for a single process

    @property
    def tp_rank(self) -> int:
        return self.rank % self.dims.tp

    @property
    def ep_rank(self) -> int:
        return (self.rank // self.dims.tp) % self.dims.ep

    @property
    def dp_rank(self) -> int:
        """Index in the flattened (edp, ep) dimension (mesh.py's rank order)."""
        return self.rank // self.dims.tp

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @staticmethod
    def single() -> "ParallelContext":
        return ParallelContext(0, ParallelDims(1, 1, 1), None)


def backend_for(device: torch.device, choice: str = "auto") -> str:
    """parallel.backend: `auto` = NCCL on CUDA, gloo on CPU; `nccl` needs a CUDA device (ValueError otherwise)."""
    if choice == "nccl" and device.type != "cuda":
        raise ValueError(f"parallel.backend='nccl' needs CUDA, but this run's device is {device.type!r}; "
                         f"use parallel.backend=auto or gloo")
    if choice != "auto":
        return choice
    return "nccl" if device.type == "cuda" else "gloo"


def init_parallel(env: LaunchEnv, dims: ParallelDims, device: torch.device, timeout_s: float,
                  backend: str = "auto") -> ParallelContext:
    """Collective: join the process group (parallel.backend; `auto`: NCCL on CUDA, gloo on CPU) and build the
    mesh."""
    if env.world_size == 1:
        return ParallelContext.single()
    backend = backend_for(device, backend)  # before touching the device: bad input fails first
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            store=restart_safe_store(env, timeout))
    return ParallelContext(env.rank, dims, build_mesh(dims, device.type))


def restart_safe_store(env: LaunchEnv, timeout: datetime.timedelta, environ=os.environ) -> Optional[dist.Store]:
    """After `torchrun --max-restarts` restarts a single-node job, the workers join the agent's TCPStore, which
    still holds the previous attempt's keys (the dead ranks' gloo/NCCL addresses): init can read them and hang
    (pytorch#135712). Give each attempt its own key prefix. Only on one node, where the restart count is the same
    for every rank (it is per agent, pytorch#108158); None = torch's default env:// rendezvous."""
    restart = environ.get("TORCHELASTIC_RESTART_COUNT")
    single_agent = environ.get("GROUP_WORLD_SIZE") == "1"  # one torchrun agent: one node
    if restart is None or environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not single_agent:
        return None
    store = dist.TCPStore(environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), env.world_size, is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"moe_train/attempt_{restart}", store)


def shutdown(ctx: ParallelContext, clean: bool = True) -> None:
    """Ranks must leave together (a rank exiting alone can abort the others' gloo teardown); after a failed
    collective there is nobody to wait for, so only the local state is torn down."""
    if ctx.groups is not None and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    release_groups(ctx)


def release_groups(ctx: ParallelContext) -> None:
    """Drop this process's last references to its process groups while the interpreter is fully alive. Left to
    interpreter exit, gloo's C++ objects were destroyed during finalization and a rank aborted ("terminate called
    without an active exception", SIGABRT) in about 1 of 10 otherwise clean exits (measured: 4 of 40 two-rank runs;
    pytorch PR 179291 describes the finalization race). The caller drops the model (its dispatchers hold groups)."""
    ctx.groups = None
    gc.collect()


COLLECTIVE_FAILURE_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")


def is_collective_failure(exc: BaseException) -> bool:
    """torch raises DistError subclasses for NCCL and store failures, but gloo transport errors are plain
    RuntimeErrors: recognise those by the transport's wording."""
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError)
                                                and any(m in text for m in COLLECTIVE_FAILURE_MARKERS))


def collective_failure_message(exc: BaseException, ctx: ParallelContext, timeout_s: float) -> str:
    return (f"rank {ctx.rank}: a collective failed, so another rank exited or stopped responding (the wait is "
            f"bounded by parallel.timeout_s={timeout_s:g}); stopping this rank. Cause: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
