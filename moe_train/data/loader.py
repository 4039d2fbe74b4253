"""Stateful, resumable batch iterators over packed token sequences, sharded by data-parallel rank in units of
micro-batches, so that every layout sees the same micro-batches.

Training (`TokenLoader`): epoch e visits the packed rows in the order of
torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + e)). That order is cut into *global*
micro-batches of micro_batch_size rows: global micro-batch m = rows perm[m b:(m + 1) b]. Rank r of dp_size takes
m = r, r + dp_size, r + 2 dp_size, ... An optimizer step of A micro-batches on one process therefore uses exactly
the micro-batches that dp ranks with A / dp accumulation steps each use together: capacity, dropping and aux losses,
all decided per micro-batch, are the same under every layout. Each epoch uses the largest multiple of dp_size
micro-batches that fits; iteration is infinite.

State (in global terms): (epoch, global micro-batches consumed in this epoch). A loader restored from
`state_dict()` yields exactly the batches the original would have; a different dp_size may resume the state when the
consumed count is a multiple of it (at step boundaries it is). A different seed, micro-batch size or data is refused.

Validation (`ValidationBatches`): global micro-batches of rows in stream order; rank r takes m = r, r + dp_size, ...
among the first `max_batches` (all full ones if None), rounded down to a multiple of dp_size (at least dp_size) so
that every rank runs the same number; the same every time it is iterated.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from moe_train.data.packing import inputs_targets, pack_sequences

Batch = tuple[torch.Tensor, ...]  # (inputs [B, seq_len] int64, targets [B, seq_len] int64[, task ids [B, seq_len]])


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need dp_size >= 1 and 0 <= dp_rank < dp_size")


def _micro_batches_per_rank(rows: torch.Tensor, what: str, seq_len: int, micro_batch_size: int,
                            dp_size: int) -> int:
    """Whole micro-batches each rank gets per pass; ValueError naming the sizes if that is none."""
    per_rank = len(rows) // micro_batch_size // dp_size
    if per_rank < 1:
        n_tokens = rows.numel()
        raise ValueError(
            f"too little {what} data: {len(rows)} sequences of seq_len+1={seq_len + 1} tokens ({n_tokens} tokens "
            f"packed) give no full micro-batch per rank: one needs micro_batch_size={micro_batch_size} "
            f"per rank x dp_size={dp_size}; use more data, a larger data.val_fraction, or a smaller seq_len/batch")
    return per_rank


def aligned_rows(labels: Optional[torch.Tensor], tasks: Optional[torch.Tensor], seq_len: int) -> tuple:
    """(label rows, task rows), each None when absent, packed like the tokens."""
    return tuple(None if s is None else pack_sequences(s, seq_len) for s in (labels, tasks))


def take(packed: torch.Tensor, aligned: tuple, rows) -> Batch:
    """The batch of packed rows `rows` (an index tensor or a slice)."""
    return inputs_targets(packed[rows], *(None if a is None else a[rows] for a in aligned))


class TokenLoader:
    """Infinite shuffled training batches of one dp rank; see the module docstring for the order."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, labels: Optional[torch.Tensor] = None,
                 tasks: Optional[torch.Tensor] = None):
        _check_layout(micro_batch_size, dp_rank, dp_size)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._rows = pack_sequences(tokens, seq_len)
        self._aligned = aligned_rows(labels, tasks, seq_len)
        self.batches_per_epoch = _micro_batches_per_rank(self._rows, "training", seq_len, micro_batch_size, dp_size)
        self.epoch, self.position = 0, 0  # position: this rank's micro-batches consumed in the epoch
        self._order: Optional[torch.Tensor] = None  # the epoch's row permutation, built lazily

    @property
    def num_sequences(self) -> int:
        """Packed rows in the whole training split (all ranks)."""
        return len(self._rows)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self._rows), generator=generator)

    def next_batch(self) -> Batch:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        start = (self.position * self.dp_size + self.dp_rank) * self.micro_batch_size  # global micro-batch
        self.position += 1
        return take(self._rows, self._aligned, self._order[start:start + self.micro_batch_size])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Plain ints; `consumed` counts global micro-batches of the epoch (all ranks, at a step boundary)."""
        return {"epoch": self.epoch, "consumed": self.position * self.dp_size, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`'s (epoch, consumed), under any dp_size that divides `consumed`; seed, micro-batch size
        and data must equal this loader's (ValueError otherwise)."""
        mine = self.state_dict()
        for key in ("seed", "micro_batch_size", "num_sequences"):
            if int(state[key]) != mine[key]:
                raise ValueError(f"loader state {key}={state[key]} does not match this loader's {key}={mine[key]}; "
                                 "resuming with a different seed, micro-batch size or data is not supported")
        consumed = int(state["consumed"])
        if consumed % self.dp_size:
            raise ValueError(f"loader state consumed={consumed} micro-batches cannot be split over "
                             f"dp_size={self.dp_size} ranks; resume at an optimizer-step boundary")
        self.epoch, self.position, self._order = int(state["epoch"]), consumed // self.dp_size, None


class ValidationBatches:
    """A fixed, re-iterable list of validation batches for this dp rank (rows in stream order)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_batches: Optional[int] = None, labels: Optional[torch.Tensor] = None,
                 tasks: Optional[torch.Tensor] = None):
        _check_layout(micro_batch_size, dp_rank, dp_size)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} must be None (all) or >= 1")
        self._rows = pack_sequences(tokens, seq_len)
        self._aligned = aligned_rows(labels, tasks, seq_len)
        _micro_batches_per_rank(self._rows, "validation", seq_len, micro_batch_size, dp_size)
        self.micro_batch_size = micro_batch_size
        total = len(self._rows) // micro_batch_size
        total = total if max_batches is None else min(total, max_batches)
        # Every rank gets the same number of batches: each evaluation batch runs the MoE all-to-all, so a rank with
        # one batch fewer would leave the others waiting (forever) in the exchange. Rounded down to a multiple of
        # dp_size, but at least one batch per rank (the data holds that many, checked above).
        self.total_batches = max(total - total % dp_size, dp_size)  # global, all ranks
        self._mine = range(dp_rank, self.total_batches, dp_size)

    def __len__(self) -> int:
        return len(self._mine)

    def __iter__(self) -> Iterator[Batch]:
        b = self.micro_batch_size
        for m in self._mine:
            rows = slice(m * b, (m + 1) * b)
            yield take(self._rows, self._aligned, rows)
