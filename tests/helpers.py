"""Builders shared by the MoE tests."""

from __future__ import annotations

import torch

from moe_train.config import MoEConfig
from moe_train.models.moe import MoELayer


def make_layer(d_model: int = 16, dtype=torch.float32, **overrides) -> MoELayer:
    defaults = dict(num_experts=4, top_k=2, d_ff=24, capacity_factor=1.25, min_capacity=0, aux_loss_coef=0.01)
    layer = MoELayer(d_model, MoEConfig(**{**defaults, **overrides}))
    return layer.to(dtype)


def param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def forward_backward(layer, x: torch.Tensor, upstream: torch.Tensor | None = None):
    """Run forward + backward of (out * upstream).sum() + aux; return (out, aux, x.grad, param grads)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out, aux = layer(x)
    upstream = torch.ones_like(out) if upstream is None else upstream
    ((out * upstream).sum() + aux).backward()
    return out.detach(), aux.detach(), x.grad, param_grads(layer)


def routing_of(layer, x_TD: torch.Tensor):
    """The router output and dispatch plan the layer computes for x_TD (same RNG draws as a forward)."""
    route = layer.router(x_TD)
    return route, route.plan


def capture_route(layer) -> dict:
    """Keep the router output of the next forward in the returned dict, its logits retaining their gradient."""
    captured = {}

    def keep(module, inputs, route):
        route.logits_TE.retain_grad()
        captured["route"] = route

    layer.router.register_forward_hook(keep)
    return captured


def load_bench_script(name: str):
    """Import bench/<name>.py as a module (bench/ is not a package; its scripts import each other by name)."""
    import importlib.util
    import pathlib
    import sys

    bench_dir = pathlib.Path(__file__).resolve().parents[1] / "bench"
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    spec = importlib.util.spec_from_file_location(name, bench_dir / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses with string annotations look their module up there
    spec.loader.exec_module(module)
    return module


def toy_text(path):
    """~12 KB of varied ASCII (400 numbered lines): enough for a few 33-token validation batches in its last 10%."""
    lines = [f"{i:04d} the {('quick', 'lazy', 'brown')[i % 3]} fox says {i * 7919 % 1000}" for i in range(400)]
    path.write_text("\n".join(lines))
    return path
