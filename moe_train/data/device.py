"""Training batches delivered on the compute device, one batch ahead.

On CUDA each batch is copied from pinned host memory with `non_blocking=True` right after the previous one is handed
out, so the host-to-device copy is queued behind the current step's kernels instead of stalling the host (a copy
from pageable memory blocks the host until it is done). On CPU the batches pass through unchanged.

The state is the wrapped loader's state *before* the prefetched batch was drawn: a checkpoint taken between steps
resumes at the batch the next step will use, exactly as without prefetching.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from moe_train.data.loader import Batch, TokenLoader


class DevicePrefetcher:
    """Wraps a TokenLoader: next_batch() returns (inputs, targets) on `device`; state_dict/load_state_dict resume."""

    def __init__(self, loader: TokenLoader, device: torch.device):
        self.loader, self.device = loader, device
        self.pin = device.type == "cuda"
        self._pending: Optional[Batch] = None
        self._state_before_pending: Optional[dict] = None

    def _fetch(self) -> Batch:
        self._state_before_pending = self.loader.state_dict()
        batch = self.loader.next_batch()
        if self.pin:
            batch = tuple(t.pin_memory() for t in batch)
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def next_batch(self) -> Batch:
        batch = self._pending if self._pending is not None else self._fetch()
        self._pending = self._fetch()  # the next step's batch, copied while this one computes
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return self._state_before_pending if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.loader.load_state_dict(state)
        self._pending = self._state_before_pending = None
