"""The one multi-process harness of the distributed tests: spawn `world_size` ranks on gloo, run a module-level
function `fn(rank, world_size, *args)` in each, and return what every rank returned (saved with torch.save).

A failing rank's traceback is re-raised in the test; a rank that does not finish within `timeout` seconds fails the
test (the others are killed) instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pathlib
import queue
import tempfile
import time
import traceback
from typing import Any, Callable

import torch

from conftest import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str, status) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # 2 cores shared by all ranks
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(fn(rank, world_size, *args), pathlib.Path(out_dir) / f"rank{rank}.pt")
        status.put((rank, None))
        dist.barrier()
    except BaseException:
        status.put((rank, traceback.format_exc()))
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout: float = 240.0,
              may_die: frozenset[int] = frozenset()) -> list[Any]:
    """Results of every rank (None for a rank in `may_die` that exited without reporting)."""
    ctx = mp.get_context("spawn")
    status = ctx.Queue()
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_dir, status), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        try:
            _wait(status, world_size - len(may_die), time.monotonic() + timeout)
        finally:
            _stop(procs)
        paths = [pathlib.Path(out_dir) / f"rank{r}.pt" for r in range(world_size)]
        return [torch.load(p, weights_only=False) if p.exists() else None for p in paths]


def _wait(status, expected: int, deadline: float) -> None:
    for _ in range(expected):
        try:
            rank, error = status.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"distributed test: not every rank finished within the timeout") from None
        if error is not None:
            raise RuntimeError(f"rank {rank} failed:\n{error}")


def _stop(procs) -> None:
    for p in procs:
        p.join(timeout=30)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
