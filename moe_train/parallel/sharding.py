"""Splitting a parameter into this rank's piece, with its ShardSpec (models/shard_spec.py) narrowed to match.

Works on any device: on the meta device (sharded construction) it only changes shapes; on a materialised model it
copies the piece so that the whole tensor can be freed.
"""

from __future__ import annotations

from torch import nn


def shard_param(model: nn.Module, name: str, dim: int, index: int, parts: int, mesh_dim: str) -> None:
    """Replace parameter `name` (qualified, in `model`) by piece `index` of `parts` along `dim`; record it."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    full = getattr(module, attr)
    spec = model.shard_specs[name].split(dim, index, parts, mesh_dim)  # ValueError if parts does not divide
    size = spec.shape[dim]
    setattr(module, attr, nn.Parameter(full.detach().narrow(dim, index * size, size).clone()))
    model.shard_specs[name] = spec
