"""Initialisation that does not depend on the layout: a rank holding a slice of a parameter initialises exactly that
slice of the unsharded initialisation, bit for bit, without ever allocating the whole model.

Each parameter draws from its own generator, seeded from (run seed, parameter name); a routed expert stack draws one
generator per global expert id (seed, name, expert). A rank that holds experts [a, b) of a stack therefore draws
only those experts' values, and a tensor-parallel slice is cut from its parameter's (or its expert's) whole value,
drawn into a temporary: the peak of building a rank's model is its shard plus the largest single (per-expert)
tensor. Megatron initialises experts the same way (per expert, master weight then slice); torchtitan instead offsets
one Philox stream per DTensor shard, which needs DTensor parameters.

Generators live on the parameter's device (CUDA draws differ from CPU draws; both are reproducible per device type).
"""

from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch
from torch import nn

from moe_train.models.shard_spec import ShardSpec

Fill = Callable[[torch.Tensor, Optional[torch.Generator]], None]


def normal(std: float) -> Fill:
    return lambda t, gen: t.normal_(0.0, std, generator=gen)


def constant(value: float) -> Fill:
    return lambda t, gen: t.fill_(value)


def param_seed(seed: int, name: str, expert: Optional[int] = None) -> int:
    """A 63-bit seed from (seed, name[, expert]); stable across processes and Python versions (no hash())."""
    key = f"{seed}/{name}" + ("" if expert is None else f"/expert{expert}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def fill_slice(p: torch.Tensor, fill: Fill, spec: ShardSpec, seed: int, dims: int) -> None:
    """p (this rank's region of a tensor whose whole value is drawn by one generator) filled with that region;
    `dims` = how many trailing dims of spec describe p (all of them, or all but the expert dim)."""
    gen = generator(p.device, seed)
    if spec.shape[-dims:] == spec.global_shape[-dims:]:
        fill(p, gen)  # p is the whole value: no temporary
        return
    whole = torch.empty(spec.global_shape[-dims:], dtype=p.dtype, device=p.device)
    fill(whole, gen)
    p.copy_(whole[spec.local_slices()[-dims:]])


@torch.no_grad()
def init_parameter(p: torch.Tensor, fill: Fill, spec: ShardSpec, seed: int, name: str) -> None:
    """Fill this rank's region of parameter `name` as the unsharded initialisation would have."""
    assert tuple(p.shape) == spec.shape, (name, tuple(p.shape), spec)
    if p.device.type == "meta":
        return
    if not spec.expert:
        fill_slice(p, fill, spec, param_seed(seed, name), p.dim())
        return
    for local in range(p.shape[0]):
        fill_slice(p[local], fill, spec, param_seed(seed, name, spec.offsets[0] + local), p.dim() - 1)


def init_fill(module: nn.Module, param_name: str, std: float) -> Fill:
    """How a parameter starts: RMSNorm weights at one, parameters a module lists in `zero_init` at zero (the noisy
    router's noise weight), every other weight ~ N(0, std^2)."""
    if isinstance(module, nn.RMSNorm):
        return constant(1.0)
    if param_name in getattr(module, "zero_init", ()):
        return constant(0.0)
    return normal(std)


def init_parameters(model: nn.Module, specs: dict[str, ShardSpec], std: float, seed: int) -> None:
    """Every parameter of `model` (or this rank's region of it, per `specs`), layout-independently."""
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2's DTensor: this rank's rows
            init_parameter(local, init_fill(module, param_name, std), specs[name], seed, name)
