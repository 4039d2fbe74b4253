"""Our capacity-mode gating and layer equal DeepSpeed's (deepspeed.moe.sharded_moe / deepspeed.moe.layer.MoE).

Policy `position`, no noise, no random token selection (use_rts=False), no second-expert sampling.

DeepSpeed's top1gating picks the surviving tokens of an overflowing expert with torch.topk over a 0/1 mask
(use_rts=False); the order in which topk returns tied entries is not specified and on CPU is not the token order, so
for top-1 with overflow we compare exactly against DeepSpeed's topkgating(k=1, drop_policy="position") and check
top1gating on everything but the choice among tied tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import forward_backward, make_layer, routing_of

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe")

SIZES = [1, 7, 64, 1000]
EXPERTS = [4, 8]
FACTORS = [1.0, 1.25, 2.0]
MIN_CAPACITY = [0, 4]
GRID = list(itertools.product(SIZES, EXPERTS, FACTORS, MIN_CAPACITY))


def routed(num_tokens, num_experts, top_k, cf, min_capacity, renormalize):
    layer = make_layer(d_model=16, num_experts=num_experts, top_k=top_k, capacity_factor=cf,
                       min_capacity=min_capacity, renormalize=renormalize, aux_loss_coef=1.0)
    torch.nn.init.normal_(layer.router.weight, std=0.5)  # a skewed router, so experts overflow
    x = torch.randn(num_tokens, 16)
    route, plan = routing_of(layer, x)
    return route, plan, layer.router_losses(route)[1]


def our_assignment(plan) -> dict[tuple[int, int, int], float]:
    """{(token, expert, slot): combine weight} of the kept pairs."""
    tokens = torch.arange(plan.num_tokens).repeat(plan.top_k)
    experts, slots = plan.dest_A // plan.capacity, plan.dest_A % plan.capacity
    keep = plan.kept_A.nonzero().flatten().tolist()
    return {(int(tokens[a]), int(experts[a]), int(slots[a])): float(plan.weights_A[a].detach()) for a in keep}


def ds_assignment(combine_SEC, dispatch_SEC) -> dict[tuple[int, int, int], float]:
    return {tuple(idx): float(combine_SEC[tuple(idx)]) for idx in dispatch_SEC.nonzero().tolist()}


def assert_same_assignment(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert abs(ours[key] - theirs[key]) <= 1e-6, key


@pytest.mark.parametrize("num_tokens,num_experts,cf,min_capacity", GRID)
def test_top2_gating_equals_deepspeed(num_tokens, num_experts, cf, min_capacity):
    route, plan, aux = routed(num_tokens, num_experts, 2, cf, min_capacity, renormalize=True)
    l_aux, combine, dispatch, _ = sharded_moe.top2gating(route.logits_TE.detach().clone(), cf, min_capacity,
                                                         top2_2nd_expert_sampling=False)
    assert plan.capacity == combine.shape[2]
    assert_same_assignment(our_assignment(plan), ds_assignment(combine, dispatch))
    torch.testing.assert_close(aux, l_aux)


@pytest.mark.parametrize("num_tokens,num_experts,cf,min_capacity", GRID)
def test_top1_gating_equals_deepspeed(num_tokens, num_experts, cf, min_capacity):
    route, plan, aux = routed(num_tokens, num_experts, 1, cf, min_capacity, renormalize=False)
    if num_tokens < min_capacity:
        with pytest.raises(AssertionError, match="min_capacity"):  # DeepSpeed refuses; we handle it (edge tests)
            sharded_moe.top1gating(route.logits_TE.detach().clone(), cf, min_capacity, use_rts=False)
        return
    l_aux, combine, dispatch, counts = sharded_moe.top1gating(route.logits_TE.detach().clone(), cf, min_capacity,
                                                              use_rts=False)
    assert plan.capacity == combine.shape[2]
    torch.testing.assert_close(aux, l_aux)
    ours, theirs = our_assignment(plan), ds_assignment(combine, dispatch)
    if int(counts.max()) <= plan.capacity:  # nothing dropped: identical to the last slot
        assert_same_assignment(ours, theirs)
    else:  # the same number of survivors per expert, compact slots, raw-probability weights
        for e in range(num_experts):
            assert sorted(s for (_, x, s) in ours if x == e) == sorted(s for (_, x, s) in theirs if x == e)
        assert {t for (t, _, _) in ours} <= set(range(num_tokens))
        assert all(abs(w - float(route.probs_TK[t, 0].detach())) < 1e-6 for (t, _, _), w in ours.items())


@pytest.mark.parametrize("num_tokens,num_experts,cf,min_capacity", GRID)
def test_top1_position_policy_equals_deepspeed_topkgating(num_tokens, num_experts, cf, min_capacity):
    route, plan, aux = routed(num_tokens, num_experts, 1, cf, min_capacity, renormalize=True)
    l_aux, combine, dispatch, _ = sharded_moe.topkgating(route.logits_TE.detach().clone(), 1, cf, min_capacity,
                                                         drop_policy="position")
    assert plan.capacity == combine.shape[2]
    assert_same_assignment(our_assignment(plan), ds_assignment(combine, dispatch))
    torch.testing.assert_close(aux, l_aux)


class SwiGLU(torch.nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w1 = torch.nn.Linear(d_model, d_ff, bias=False)
        self.w3 = torch.nn.Linear(d_model, d_ff, bias=False)
        self.w2 = torch.nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


def build_deepspeed_pair(top_k, cf, min_capacity, num_experts=4, d_model=16, d_ff=24):
    from deepspeed.moe.layer import MoE

    ds = MoE(d_model, SwiGLU(d_model, d_ff), num_experts=num_experts, ep_size=1, k=top_k, capacity_factor=cf,
             eval_capacity_factor=cf, min_capacity=min_capacity, use_rts=False, top2_2nd_expert_sampling=False)
    ours = make_layer(d_model=d_model, num_experts=num_experts, top_k=top_k, d_ff=d_ff, capacity_factor=cf,
                      min_capacity=min_capacity, renormalize=top_k > 1, aux_loss_coef=1.0)
    torch.nn.init.normal_(ours.router.weight, std=0.5)
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(experts):
            for name in ("w1", "w2", "w3"):
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[e])
    return ds, ours


@pytest.mark.parametrize("top_k,cf,min_capacity", [(2, 1.25, 4), (2, 0.5, 0), (1, 4.0, 0)])
def test_layer_equals_deepspeed_moe(single_process_group, top_k, cf, min_capacity):
    ds, ours = build_deepspeed_pair(top_k, cf, min_capacity)
    x = torch.randn(2, 33, 16)
    upstream = torch.randn(2, 33, 16)
    out, aux, gx, grads = forward_backward(ours, x, upstream)
    if cf < 1:
        assert ours.last_stats.drop_frac.item() > 0, "the case is meant to drop tokens"

    xd = x.clone().requires_grad_(True)
    out_ds, l_aux, _ = ds(xd)
    ((out_ds * upstream).sum() + l_aux).backward()
    torch.testing.assert_close(out, out_ds.detach())
    torch.testing.assert_close(aux, l_aux.detach())
    torch.testing.assert_close(gx, xd.grad)
    torch.testing.assert_close(grads["router.weight"], ds.deepspeed_moe.gate.wg.weight.grad)
    for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        for name in ("w1", "w2", "w3"):
            torch.testing.assert_close(grads[f"experts.{name}"][e], getattr(expert, name).weight.grad)
