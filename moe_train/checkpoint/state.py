"""This rank's share of a checkpoint (model and optimizer chunks, RNG states) and how it is read back.

Tensor keys in the manifest: `model/<param>` and `optim/<param>/<state>` (AdamW's exp_avg, exp_avg_sq), global
tensors stored as chunks (placement.py). Per-parameter optimizer scalars (AdamW's `step`) go to JSON.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_train.checkpoint.placement import Placement, placements
from moe_train.checkpoint.storage import ChunkReader
from moe_train.models.shard_spec import persistent_buffers
from moe_train.parallel.context import ParallelContext


def chunk_key(tensor_key: str, offsets: tuple[int, ...]) -> str:
    return f"{tensor_key}@{','.join(map(str, offsets))}"


def rank_share(model: nn.Module, holder, ctx: ParallelContext, file: str) -> tuple[dict, dict, dict]:
    """(tensors this rank writes to `file` by chunk key, their index entries by tensor key, the optimizer scalars
    of the parameters whose state it writes). `holder`: who holds weights and optimizer state (holders.py)."""
    place = placements(model, ctx)
    tensors, index, scalars = {}, {}, {}
    for name, p in model.named_parameters():
        pl = place[name]
        for start, flat in holder.weights(p, pl.writer):
            add_chunks(tensors, index, f"model/{name}", pl, start, flat, file)
        for start, state in holder.fragments(p, pl.writer):
            for key, flat in state.items():
                add_chunks(tensors, index, f"optim/{name}/{key}", pl, start, flat, file)
            scalars[name] = holder.scalars(p)  # host sync per parameter (small; only when saving)
    for name, buf in persistent_buffers(model).items():  # identical on every rank: rank 0 writes them
        if ctx.rank == 0:
            add_chunks(tensors, index, f"model/{name}", whole_placement(buf), 0, buf.detach().reshape(-1), file)
    return tensors, index, {name: values for name, values in scalars.items() if values}


def whole_placement(t: torch.Tensor) -> Placement:
    return Placement(tuple(t.shape), (0,) * t.dim(), tuple(t.shape), per_expert=False, writer=True)


def add_chunks(tensors: dict, index: dict, key: str, place: Placement, start: int, flat: torch.Tensor,
               file: str) -> None:
    """Store elements [start, start + len(flat)) of the flattened local tensor `key` as chunks of its global tensor."""
    entry = index.setdefault(key, {"global_shape": list(place.global_shape), "dtype": str(flat.dtype), "chunks": []})
    for offsets, shape, elements in place.chunks(start, start + flat.numel()):
        ck = chunk_key(key, offsets)
        tensors[ck] = flat[elements.start - start:elements.stop - start].view(shape)
        entry["chunks"].append({"file": file, "key": ck, "offsets": list(offsets), "shape": list(shape)})


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng/cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["rng/torch"])
    if device.type == "cuda" and "rng/cuda" in states:
        torch.cuda.set_rng_state(states["rng/cuda"], device)


def read_local(reader: ChunkReader, key: str, p: torch.Tensor, place: Placement) -> torch.Tensor:
    """The whole local region of global tensor `key` for parameter p."""
    out = torch.empty(place.shape, dtype=p.dtype, device=p.device)
    reader.read_into(key, out, place.offsets)
    return out


@torch.no_grad()
def load_model(model: nn.Module, holder, reader: ChunkReader, place: dict[str, Placement]) -> list[str]:
    """Parameters and persistent buffers from the checkpoint; returns the buffers it lacks (they keep their
    initial values: a balancing bias switched on when resuming starts at zero)."""
    for name, p in model.named_parameters():
        holder.load_weights(p, read_local(reader, f"model/{name}", p, place[name]))
    missing = []
    for name, buf in persistent_buffers(model).items():
        if f"model/{name}" in reader.index:
            buf.copy_(read_local(reader, f"model/{name}", buf, whole_placement(buf)))
        else:
            missing.append(name)
    return missing


@torch.no_grad()
def load_optimizer(model: nn.Module, holder, reader: ChunkReader, place: dict[str, Placement],
                   scalars: dict[str, dict[str, float]]) -> None:
    """Rebuild each parameter's optimizer state from the chunks of its region (the layout may differ), then let
    the holder finish (ZeRO: the fp32 master partitions from the loaded weights)."""
    for name, p in (item for item in model.named_parameters() if holder.holds(item[1])):
        prefix = f"optim/{name}/"
        tensors = {key[len(prefix):]: read_local(reader, key, p, place[name])
                   for key in reader.index if key.startswith(prefix)}
        holder.load(p, tensors, scalars.get(name, {}))
    holder.finish_load()
