"""Stateful, resumable batch iterators over packed token sequences, sharded by data-parallel rank.

Training (`TokenLoader`): epoch e visits the packed rows in the order of
torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + e)). The permutation is cut to a multiple
of dp_size and rank r takes positions r, r + dp_size, r + 2 dp_size, ..., so ranks see disjoint rows within an epoch
and the same number of them; each rank then drops its remainder of < micro_batch_size rows. Iteration is infinite.
The state is (epoch, position = micro-batches consumed in this epoch); a loader restored from `state_dict()` yields
exactly the batches the original would have. Resuming under another dp layout, seed, batch size or data is refused
with a ValueError (the permutation would differ), so change them only when starting a new run.

Validation (`ValidationBatches`): the rows in stream order, rank r takes rows r, r + dp_size, ..., in full batches;
the first `max_batches` of them, the same every time it is iterated.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from moe_train.data.packing import inputs_targets, pack_sequences

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, seq_len] int64, targets [B, seq_len] int64)


def _check_layout(micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need dp_size >= 1 and 0 <= dp_rank < dp_size")


def _rows_per_rank(rows: torch.Tensor, what: str, seq_len: int, micro_batch_size: int, dp_size: int) -> int:
    """Rows each rank gets; ValueError naming the sizes if that is less than one micro-batch."""
    per_rank = len(rows) // dp_size
    if per_rank < micro_batch_size:
        n_tokens = rows.numel()
        raise ValueError(
            f"too little {what} data: {len(rows)} sequences of seq_len+1={seq_len + 1} tokens ({n_tokens} tokens "
            f"packed) give {per_rank} per rank, but one micro-batch needs micro_batch_size={micro_batch_size} "
            f"per rank x dp_size={dp_size}; use more data, a larger data.val_fraction, or a smaller seq_len/batch")
    return per_rank


class TokenLoader:
    """Infinite shuffled training batches of one dp rank; see the module docstring for the order."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        _check_layout(micro_batch_size, dp_rank, dp_size)
        self.seq_len, self.micro_batch_size, self.seed = seq_len, micro_batch_size, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._rows = pack_sequences(tokens, seq_len)
        per_rank = _rows_per_rank(self._rows, "training", seq_len, micro_batch_size, dp_size)
        self.batches_per_epoch = per_rank // micro_batch_size
        self.epoch, self.position = 0, 0
        self._order: Optional[torch.Tensor] = None  # this rank's row ids for self.epoch, built lazily

    @property
    def num_sequences(self) -> int:
        """Packed rows in the whole training split (all ranks)."""
        return len(self._rows)

    def _rank_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self._rows), generator=generator)
        usable = len(perm) // self.dp_size * self.dp_size
        return perm[self.dp_rank:usable:self.dp_size]

    def next_batch(self) -> Batch:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._rank_order(self.epoch)
        start = self.position * self.micro_batch_size
        self.position += 1
        return inputs_targets(self._rows[self._order[start:start + self.micro_batch_size]])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "dp_rank": self.dp_rank,
                "dp_size": self.dp_size, "micro_batch_size": self.micro_batch_size,
                "num_sequences": self.num_sequences}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`'s (epoch, position); every other key must equal this loader's (ValueError otherwise)."""
        mine = self.state_dict()
        for key in ("dp_size", "dp_rank", "seed", "micro_batch_size", "num_sequences"):
            if key in state and int(state[key]) != mine[key]:
                raise ValueError(f"loader state {key}={state[key]} does not match this loader's {key}={mine[key]}; "
                                 "resuming with a different seed, dp layout, batch size or data is not supported")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class ValidationBatches:
    """A fixed, re-iterable list of validation batches for this dp rank (rows in stream order)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, max_batches: Optional[int] = None):
        _check_layout(micro_batch_size, dp_rank, dp_size)
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches={max_batches} must be None (all) or >= 1")
        rows = pack_sequences(tokens, seq_len)
        per_rank = _rows_per_rank(rows, "validation", seq_len, micro_batch_size, dp_size)
        self._rows = rows[dp_rank:per_rank * dp_size:dp_size]
        self.micro_batch_size = micro_batch_size
        full = per_rank // micro_batch_size
        self.num_batches = full if max_batches is None else min(full, max_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        b = self.micro_batch_size
        for i in range(self.num_batches):
            yield inputs_targets(self._rows[i * b:(i + 1) * b])
