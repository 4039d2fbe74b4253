"""Expert parallelism on gloo: the all-to-all dispatcher gives each token the result it gets on one process, and
the expert and router gradients equal the single-process ones (capacity and dropless)."""

from __future__ import annotations

import pytest
import torch

from helpers import make_layer
from moe_train.models.moe.experts import expert_param_ids
from moe_train.models.shard_spec import whole_specs
from multiproc import run_ranks

T, D = 12, 16


def inputs(rank: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, D, generator=g)
    return (x.abs() if mode == "skewed" else x), torch.randn(T, D, generator=g)


MODE_CONFIGS = {"capacity": dict(capacity_factor=1.0), "dropless": dict(capacity_factor=-1.0),
                "skewed": dict(capacity_factor=-1.0),
                "expert_choice": dict(router="expert_choice", capacity_factor=1.0),
                "sigmoid_bias": dict(score_func="sigmoid", bias_update_rate=1e-3, capacity_factor=1.0),
                "sequence_scope": dict(aux_loss_scope="sequence", capacity_factor=-1.0)}


def layer_for(mode: str):
    torch.manual_seed(0)
    layer = make_layer(d_model=D, num_experts=4, top_k=2, min_capacity=0, **MODE_CONFIGS[mode])
    if mode == "sigmoid_bias":
        layer.router.expert_bias.copy_(torch.tensor([0.2, -0.1, 0.0, 0.05]))
    if mode == "skewed":  # every token picks experts 0 and 1: rank 1's experts receive no rows at all
        with torch.no_grad():  # with positive inputs, experts 0 and 1 always have the larger logits
            layer.router.weight[:2] = 0.1
            layer.router.weight[2:] = -0.1
    return layer


def shard_layer(layer, apply_ep, group, rank: int, world_size: int) -> None:
    """apply_ep on a model holding just `layer` (its experts sharded in place, the all-to-all dispatcher set)."""
    model = torch.nn.Module()
    model.moe = layer
    model.shard_specs = whole_specs(model, expert_param_ids(model))
    apply_ep(model, group, rank, world_size)


def run_ep_layer(rank: int, world_size: int, mode: str) -> dict:
    import torch.distributed as dist

    from moe_train.parallel.expert_parallel import apply_ep

    layer = layer_for(mode)
    shard_layer(layer, apply_ep, dist.group.WORLD, rank, world_size)
    x, g = inputs(rank, mode)
    out, aux = layer(x)
    ((out * g).sum() + aux).backward()
    return {"out": out.detach(), "router": layer.router.weight.grad, "w1": layer.experts.w1.grad,
            "w2": layer.experts.w2.grad, "w3": layer.experts.w3.grad, "counts": layer.last_stats.tokens_per_expert}


def reference(mode: str, world_size: int) -> tuple[list[torch.Tensor], dict]:
    layer = layer_for(mode)
    outs = []
    for rank in range(world_size):
        x, g = inputs(rank, mode)
        out, aux = layer(x)
        ((out * g).sum() + aux).backward()
        outs.append(out.detach())
    grads = {name: getattr(layer.experts, name).grad for name in ("w1", "w2", "w3")}
    return outs, {**grads, "router": layer.router.weight.grad}


@pytest.mark.parametrize("mode", sorted(MODE_CONFIGS))
def test_ep2_outputs_and_gradients_equal_single_process(mode):
    results = run_ranks(2, run_ep_layer, mode)
    outs, grads = reference(mode, 2)
    for rank, res in enumerate(results):
        assert torch.allclose(res["out"], outs[rank], atol=1e-6)
        for name in ("w1", "w2", "w3"):  # rank r owns experts [2r, 2r + 2)
            ref = grads[name][2 * rank:2 * rank + 2] if grads[name] is not None else None
            got = res[name]
            assert (got is None or not got.any()) if ref is None else torch.allclose(got, ref, atol=1e-6), name
    assert torch.allclose(results[0]["router"] + results[1]["router"], grads["router"], atol=1e-6)
    assert results[0]["counts"].sum() > 0
    if mode == "skewed":
        assert results[0]["counts"][2:].sum() == 0 and results[1]["counts"][2:].sum() == 0


def run_ep_layer_bf16(rank: int, world_size: int, mode: str) -> dict:
    """Under bf16 autocast: the dtypes the all-to-all sends (forward), the output and the expert gradients."""
    import torch.distributed as dist

    import moe_train.parallel.expert_parallel as ep

    sent = []
    exchange = ep.all_to_all
    ep.all_to_all = lambda x, *args, **kwargs: sent.append(x.dtype) or exchange(x, *args, **kwargs)
    layer = layer_for(mode)
    shard_layer(layer, ep.apply_ep, dist.group.WORLD, rank, world_size)
    x, g = inputs(rank, mode)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = layer(x)
    ((out * g).sum() + aux).backward()
    return {"sent": sent, "out": out.dtype, "w1_grad": layer.experts.w1.grad.dtype}


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_ep2_all_to_all_carries_bf16_under_autocast(mode):
    for res in run_ranks(2, run_ep_layer_bf16, mode):
        assert res["sent"] == [torch.bfloat16, torch.bfloat16], res  # dispatch and combine
        assert res["out"] == torch.float32 and res["w1_grad"] == torch.float32  # float32 masters
