"""This rank's share of a checkpoint (model and optimizer chunks, RNG states) and how it is read back.

Tensor keys in the manifest: `model/<param>` and `optim/<param>/<state>` (AdamW's exp_avg, exp_avg_sq), global
tensors stored as chunks (placement.py). Per-parameter optimizer scalars (AdamW's `step`) go to JSON.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from moe_train.checkpoint.placement import Placement, placements
from moe_train.checkpoint.storage import ChunkReader
from moe_train.parallel.context import ParallelContext


def chunk_key(tensor_key: str, offsets: tuple[int, ...]) -> str:
    return f"{tensor_key}@{','.join(map(str, offsets))}"


def shaped_like(value, p: torch.Tensor) -> bool:
    """An optimizer state entry stored as chunks like its parameter (exp_avg), as opposed to a scalar (step)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape


def local_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(param name, tensor key, local tensor) of the model and of every optimizer state shaped like its param."""
    names = {id(p): name for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        yield name, f"model/{name}", p.detach()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if shaped_like(value, p):
                    yield names[id(p)], f"optim/{names[id(p)]}/{key}", value


def optimizer_scalars(model: nn.Module, optimizer: torch.optim.Optimizer,
                      include: set[str]) -> dict[str, dict[str, float]]:
    """Per parameter named in `include`, the optimizer state entries not shaped like it (AdamW's `step`)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in (p for p in group["params"] if names[id(p)] in include):
            scalars = {k: float(v) for k, v in optimizer.state.get(p, {}).items() if not shaped_like(v, p)}
            if scalars:
                out[names[id(p)]] = scalars  # host sync per parameter (small; only when saving)
    return out


def rank_share(model: nn.Module, optimizer, ctx: ParallelContext, file: str) -> tuple[dict, dict, dict]:
    """(tensors this rank writes to `file` by chunk key, their index entries by tensor key, the optimizer scalars
    of the parameters it writes)."""
    place = placements(model, ctx)
    tensors, index = {}, {}
    for name, key, local in local_tensors(model, optimizer):
        p = place[name]
        if not p.writer:
            continue
        entry = index.setdefault(key, {"global_shape": list(p.global_shape), "dtype": str(local.dtype),
                                       "chunks": []})
        for offsets, shape, rows in p.chunks():
            ck = chunk_key(key, offsets)
            tensors[ck] = local[rows]
            entry["chunks"].append({"file": file, "key": ck, "offsets": list(offsets), "shape": list(shape)})
    scalars = optimizer_scalars(model, optimizer, {name for name, p in place.items() if p.writer})
    return tensors, index, scalars


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng/cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["rng/torch"])
    if device.type == "cuda" and "rng/cuda" in states:
        torch.cuda.set_rng_state(states["rng/cuda"], device)


@torch.no_grad()
def load_model(model: nn.Module, reader: ChunkReader, place: dict[str, Placement]) -> None:
    for name, p in model.named_parameters():
        reader.read_into(f"model/{name}", p.data, place[name].offsets)


@torch.no_grad()
def load_optimizer(model: nn.Module, optimizer, reader: ChunkReader, place: dict[str, Placement],
                   scalars: dict[str, dict[str, float]]) -> None:
    """Rebuild each parameter's optimizer state from the chunks of its region (the layout may differ)."""
    for name, p in model.named_parameters():
        prefix = f"optim/{name}/"
        state = {k: torch.tensor(v, dtype=torch.float32) for k, v in scalars.get(name, {}).items()}
        for key in (k for k in reader.index if k.startswith(prefix)):
            buf = torch.empty_like(p, memory_format=torch.contiguous_format)
            reader.read_into(key, buf, place[name].offsets)
            state[key[len(prefix):]] = buf
        if state:
            optimizer.state[p] = state
