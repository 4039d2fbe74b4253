"""Who holds a parameter's weights and optimizer state, as the checkpoint code reads and writes them.

A checkpoint stores each parameter, and each of its optimizer state tensors (AdamW's exp_avg, exp_avg_sq), as
chunks of the global tensor (placement.py), and the state's scalars (AdamW's step) in JSON. Who holds them differs:
  * no ZeRO, or ZeRO 0 (whose optimizer is our torch AdamW): whole local tensors on every replica, the parameter
    and `optimizer.state[param]`; the placement's writer stores them;
  * ZeRO 1/2: weights as above, but the inner optimizer steps one flat fp32 partition per optimizer group and
    data-parallel rank, so a parameter's state is spread over the ranks of its group's data-parallel group (dp for
    dense groups, edp for expert groups), each holding one contiguous range of the flattened parameter;
  * ZeRO 3: the weights are partitioned the same way (`ds_tensor`).
Every rank stores the ranges it holds, as chunks of the global tensors: no collective, no rank ever holds more than
its partitions (ZeRO's memory saving survives the save), and the files have the one format that any layout and any
ZeRO stage reads. Loading copies each rank's ranges out of the whole local tensors read from the chunks.

The ZeRO holders read DeepSpeed 0.19.8 internals (`_hp_mapping`, `single_partition_of_fp32_groups`, `grad_position`,
`fp32_partitioned_groups_flat`, `ds_tensor`, `refresh_fp32_params`), pinned by tests/test_checkpoint_zero.py.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist


def per_element(value) -> bool:
    """An optimizer state entry with one value per parameter element (exp_avg), stored as chunks; the others are
    scalars (AdamW's step), stored in JSON."""
    return torch.is_tensor(value) and value.dim() > 0


def scalars_of(state: dict) -> dict[str, float]:
    """The scalar entries of one state dict; a host sync each."""
    return {k: float(v) for k, v in state.items() if not per_element(v)}


def state_scalar(optimizer: torch.optim.Optimizer, p: torch.Tensor, value: float) -> torch.Tensor:
    """An optimizer-state scalar (AdamW's `step`) where torch itself keeps it: on p's device in fused or capturable
    param groups (their kernels read it there: a CPU `step` crashed the fused CUDA AdamW on resume), else on the
    CPU."""
    group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), {})
    device = p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
    return torch.tensor(value, dtype=torch.float32, device=device)


class TorchState:
    """Whole local tensors: the parameter, and `optimizer.state[param]` of a torch optimizer (also under ZeRO 0,
    whose optimizer is ours); the placement's writer stores them."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def holds(self, p: torch.Tensor) -> bool:
        """Whether this rank holds any of p's optimizer state (else loading skips reading it)."""
        return True

    def weights(self, p: torch.Tensor, writer: bool) -> Iterator[tuple[int, torch.Tensor]]:
        """(first element in the flattened parameter, flat range) of what this rank stores of p's weights."""
        if writer:
            yield 0, p.detach().reshape(-1)

    def load_weights(self, p: torch.Tensor, whole: torch.Tensor) -> None:
        """whole: the local parameter's full value, read from the checkpoint."""
        p.data.copy_(whole)

    def fragments(self, p: torch.Tensor, writer: bool) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(first element in the flattened parameter, {state key: flat range}) of what this rank stores of p's
        optimizer state."""
        state = {k: v.reshape(-1) for k, v in self.optimizer.state.get(p, {}).items()
                 if per_element(v) and v.shape == p.shape}
        if writer and state:
            yield 0, state

    def scalars(self, p: torch.Tensor) -> dict[str, float]:
        return scalars_of(self.optimizer.state.get(p, {}))

    def load(self, p: torch.Tensor, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
        """tensors: the whole local state, shaped like p."""
        state = {k: state_scalar(self.optimizer, p, v) for k, v in scalars.items()} | tensors
        if state:
            self.optimizer.state[p] = state

    def finish_load(self) -> None:
        pass


class PartitionedState(TorchState):
    """ZeRO's optimizer: the inner optimizer steps flat fp32 partitions; each rank stores and loads the ranges of
    the parameters its partitions hold. Subclasses `locate` a parameter's range."""

    def __init__(self, zero_optimizer):
        super().__init__(zero_optimizer.optimizer)
        self.zero = zero_optimizer

    def locate(self, p: torch.Tensor) -> tuple[torch.Tensor, int, int, int] | None:
        """(flat fp32 partition, offset in it, first element of the flattened parameter, element count) of p's
        range on this rank; None if it holds none of p."""
        raise NotImplementedError

    def holds(self, p: torch.Tensor) -> bool:
        return self.locate(p) is not None

    def fragments(self, p: torch.Tensor, writer: bool) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        where = self.locate(p)
        if where is None:
            return
        flat, offset, start, count = where
        state = {k: v.narrow(0, offset, count) for k, v in self.optimizer.state.get(flat, {}).items() if per_element(v)}
        if state:
            yield start, state

    def scalars(self, p: torch.Tensor) -> dict[str, float]:
        where = self.locate(p)
        return scalars_of(self.optimizer.state.get(where[0], {})) if where is not None else {}

    def load(self, p: torch.Tensor, tensors: dict[str, torch.Tensor], scalars: dict[str, float]) -> None:
        """Creates the partition's state on first use (zeros, then filled range by range), scalars from p's."""
        where = self.locate(p)
        if where is None or not tensors:
            return
        flat, offset, start, count = where
        state = self.optimizer.state.setdefault(flat, {})
        for key, value in tensors.items():
            target = state.setdefault(key, torch.zeros_like(flat))
            target.narrow(0, offset, count).copy_(value.reshape(-1)[start:start + count])
        for key, value in scalars.items():
            state.setdefault(key, state_scalar(self.optimizer, flat, value))

    def finish_load(self) -> None:
        """The fp32 master partitions from the loaded weights (equal to them in float32 training)."""
        self.zero.refresh_fp32_params()


class Zero12State(PartitionedState):
    """ZeRO 1/2: parameters are whole on every rank (stored by the writer); `_hp_mapping` gives each one's range in
    this rank's partition of its optimizer group (dp group for dense, edp group for expert groups)."""

    def locate(self, p):
        mapping = p._hp_mapping
        if mapping is None:
            return None
        flat = self.zero.single_partition_of_fp32_groups[mapping.param_group_index]
        address = mapping.lp_fragment_address
        return flat, mapping.get_hp_fragment_address().start, address.start, address.numel

    def finish_load(self) -> None:
        super().finish_load()
        self.zero._hp_optimizer_states_linked = False  # DeepSpeed relinks its views of the state after a step


class Zero3State(PartitionedState):
    """ZeRO 3: the parameters are partitioned too. Rank r of a parameter's group holds elements [r * n, r * n + n)
    of it in `ds_tensor` (n = the padded partition size; the last rank's tail is padding), and stores them."""

    def _range(self, p: torch.Tensor) -> tuple[int, int]:
        size = p.ds_tensor.ds_numel
        start = size * dist.get_rank(p.ds_process_group)
        return start, max(0, min(size, p.ds_numel - start))

    def locate(self, p):
        group, offset, _ = self.zero.grad_position[self.zero.get_param_id(p)]
        start, count = self._range(p)
        return (self.zero.fp32_partitioned_groups_flat[group], offset, start, count) if count else None

    def weights(self, p, writer):
        start, count = self._range(p)
        if count:
            yield start, p.ds_tensor[:count]

    def load_weights(self, p, whole):
        start, count = self._range(p)
        p.ds_tensor[:count].copy_(whole.reshape(-1)[start:start + count])
