"""Oracle tests of the MoE layer: dense FFN, per-expert loop reference, gradcheck, aux-loss gradient, edge cases."""

from __future__ import annotations

import pytest
import torch

from helpers import capture_route, forward_backward, make_layer, routing_of
from moe_train.models.moe import loop_reference
from moe_train.models.moe import losses
from moe_train.models.moe.activations import expert_mlp

MODES = {"capacity": dict(capacity_factor=1.25), "dropless": dict(capacity_factor=-1.0, eval_capacity_factor=-1.0)}


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_expert_top1_equals_dense_ffn(activation, mode):
    layer = make_layer(num_experts=1, top_k=1, activation=activation, aux_loss_coef=0.0, renormalize=True,
                       **({"capacity_factor": 1.0} if mode == "capacity" else MODES[mode]))
    x = torch.randn(3, 11, 16)
    out, _, gx, grads = forward_backward(layer, x)

    w = {n: getattr(layer.experts, n)[0].detach().clone().requires_grad_(True) for n in ("w1", "w2")}
    w3 = layer.experts.w3[0].detach().clone().requires_grad_(True) if activation == "swiglu" else None
    xd = x.clone().requires_grad_(True)
    dense = expert_mlp(xd, w["w1"], w["w2"], w3, activation)
    dense.sum().backward()
    torch.testing.assert_close(out, dense.detach())
    torch.testing.assert_close(gx, xd.grad)
    torch.testing.assert_close(grads["experts.w1"][0], w["w1"].grad)
    torch.testing.assert_close(grads["experts.w2"][0], w["w2"].grad)
    if w3 is not None:
        torch.testing.assert_close(grads["experts.w3"][0], w3.grad)


def _reference_forward_backward(layer, x_TD, upstream_TD):
    """Routing from the layer's own router, experts via the mask-based loop; same loss as forward_backward."""
    layer.zero_grad(set_to_none=True)
    x_TD = x_TD.detach().clone().requires_grad_(True)
    route, plan = routing_of(layer, x_TD)
    weights_TK = plan.weights_A.view(plan.top_k, -1).t()
    out = loop_reference(x_TD, route.ids_TK, weights_TK, layer.experts)
    aux = layer.router_losses(route)[0]
    ((out * upstream_TD).sum() + aux).backward()
    return out.detach(), x_TD.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


CASES = [
    dict(capacity_factor=1.25, expert_impl="loop"),
    dict(capacity_factor=1.25, expert_impl="grouped"),
    dict(capacity_factor=0.5, expert_impl="loop"),  # heavy dropping
    dict(capacity_factor=0.5, expert_impl="grouped"),
    dict(capacity_factor=1.0, drop_policy="probability"),
    dict(capacity_factor=1.0, renormalize=False, top_k=1),
    dict(capacity_factor=-1.0, expert_impl="loop"),
    dict(capacity_factor=-1.0, expert_impl="grouped"),
    dict(capacity_factor=-1.0, top_k=3, activation="gelu"),
    dict(capacity_factor=1.25, num_shared_experts=0, activation="relu"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_grouped_and_batched_equal_loop_reference(case):
    layer = make_layer(d_model=16, num_experts=4, **{"top_k": 2, "d_ff": 32, **case})
    x_TD = torch.randn(37, 16)
    upstream = torch.randn(37, 16)
    out, _, gx, grads = forward_backward(layer, x_TD, upstream)
    ref_out, ref_gx, ref_grads = _reference_forward_backward(layer, x_TD, upstream)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_shared_experts_are_added_to_routed_output():
    layer = make_layer(num_shared_experts=2, d_ff=8)
    assert layer.shared_experts.w1.shape == (16, 16)
    x = torch.randn(9, 16)
    out, _ = layer(x)
    routed_layer_out = out - layer.shared_experts(x)
    layer.shared_experts = None
    torch.testing.assert_close(routed_layer_out, layer(x)[0])


def test_routed_scale_multiplies_the_routed_output_only():
    layer = make_layer(num_shared_experts=1, d_ff=8)
    x = torch.randn(9, 16)
    out, aux = layer(x)
    shared = layer.shared_experts(x)
    layer.cfg.routed_scale = 2.5
    scaled, scaled_aux = layer(x)
    torch.testing.assert_close(scaled - shared, 2.5 * (out - shared))
    torch.testing.assert_close(scaled_aux, aux)


@pytest.mark.parametrize("impl,activation,cf", [("loop", "swiglu", 0.5), ("grouped", "swiglu", 0.5),
                                               ("loop", "gelu", 0.5), ("loop", "swiglu", -1.0)])
def test_gradcheck_float64(impl, activation, cf):
    layer = make_layer(d_model=4, num_experts=3, top_k=2, d_ff=5, capacity_factor=cf, min_capacity=0,
                       z_loss_coef=0.1, dtype=torch.float64, expert_impl=impl, activation=activation)
    x = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    _, plan = routing_of(layer, x.detach())
    if cf > 0:
        assert plan.capacity == 3 and not bool(plan.kept_A.all()), "the test needs dropping to be active"
    params = list(layer.parameters())

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip([n for n, _ in layer.named_parameters()], ps))):
            out, aux = layer(x)
        return out, aux

    assert torch.autograd.gradcheck(fn, (x, *[p.detach().clone().requires_grad_(True) for p in params]),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("counting", ["first", "all"])
def test_aux_loss_gradient_on_router_logits(counting):
    coef = 0.37
    layer = make_layer(aux_loss_coef=coef, z_loss_coef=0.0, aux_loss_counting=counting)
    captured = capture_route(layer)
    out, aux = layer(torch.randn(21, 16))
    aux.backward()  # the balancing gradient alone
    route = captured["route"]
    logits = route.logits_TE.detach().requires_grad_(True)
    f_E = torch.bincount(route.ids_TK[:, 0] if counting == "first" else route.ids_TK.flatten(), minlength=4) / 21
    l_aux = 4 * (f_E * torch.softmax(logits, -1).mean(0)).sum()  # E * sum_e f_e P_e, written out independently
    expected = coef * torch.autograd.grad(l_aux, logits)[0]
    torch.testing.assert_close(route.logits_TE.grad, expected)


def test_z_loss_gradient_on_router_logits():
    layer = make_layer(aux_loss_coef=0.0, z_loss_coef=0.01)
    captured = capture_route(layer)
    _, aux = layer(torch.randn(13, 16))
    aux.backward()
    logits = captured["route"].logits_TE.detach().requires_grad_(True)
    expected = torch.autograd.grad(0.01 * torch.logsumexp(logits, -1).pow(2).mean(), logits)[0]
    torch.testing.assert_close(captured["route"].logits_TE.grad, expected)


# -- edge cases ----------------------------------------------------------------------------------------------------

def _check_against_reference(layer, x_TD):
    out, _, gx, grads = forward_backward(layer, x_TD)
    ref_out, ref_gx, ref_grads = _reference_forward_backward(layer, x_TD, torch.ones_like(x_TD))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_capacity_below_min_capacity_uses_min_capacity():
    layer = make_layer(num_experts=8, top_k=1, capacity_factor=1.0, min_capacity=4)
    _, plan = routing_of(layer, torch.randn(8, 16))  # ceil(8 / 8 * 1) = 1 < 4
    assert plan.capacity == 4
    _check_against_reference(layer, torch.randn(8, 16))


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_capacity_larger_than_token_count(num_tokens):
    # DeepSpeed asserts here ("No. of tokens (batch-size) should be greater than min_capacity").
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=2.0, min_capacity=16)
    x = torch.randn(num_tokens, 16)
    _, plan = routing_of(layer, x)
    assert plan.capacity == 16 > num_tokens and bool(plan.kept_A.all())
    _check_against_reference(layer, x)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_token(mode):
    layer = make_layer(num_experts=4, top_k=2, **MODES[mode])
    _check_against_reference(layer, torch.randn(1, 16))


def test_every_token_chooses_the_same_expert():
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=0, renormalize=False)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2, 0] = 10.0
    x = torch.randn(12, 16).abs() + 0.1  # feature 0 > 0 => expert 2 wins everywhere
    route, plan = routing_of(layer, x)
    assert bool((route.ids_TK[:, 0] == 2).all()) and plan.capacity == 3
    assert plan.counts_E.tolist() == [0, 0, 3, 0]
    assert plan.kept_A.nonzero().flatten().tolist() == [0, 1, 2]  # position policy keeps the earliest tokens
    out, _ = layer(x)
    assert torch.count_nonzero(out[3:]) == 0  # dropped tokens contribute nothing (residual only)
    assert abs(layer.last_stats.drop_frac.item() - 0.75) < 1e-6
    _check_against_reference(layer, x)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_k_equals_num_experts(mode):
    layer = make_layer(num_experts=3, top_k=3, **MODES[mode])
    x = torch.randn(10, 16)
    route, plan = routing_of(layer, x)
    assert sorted(route.ids_TK[0].tolist()) == [0, 1, 2]
    _check_against_reference(layer, x)


def test_stats_without_host_sync_and_consistent():
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.75)
    out, aux = layer(torch.randn(40, 16))
    stats = layer.last_stats
    assert all(t.device == out.device and not t.requires_grad
               for t in (stats.tokens_per_expert, stats.drop_frac, stats.router_entropy, stats.aux_loss))
    kept = stats.tokens_per_expert.sum().item()
    assert kept <= 4 * stats.capacity
    assert abs(stats.drop_frac.item() - (1 - kept / 80)) < 1e-6
    assert 0 < stats.router_entropy.item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
    torch.testing.assert_close(aux, 0.01 * stats.aux_loss)


def test_bfloat16_matches_float32():
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=-1.0, d_ff=32)
    layer_bf16 = make_layer(num_experts=4, top_k=2, capacity_factor=-1.0, d_ff=32)
    layer_bf16.load_state_dict(layer.state_dict())
    layer_bf16.experts.to(torch.bfloat16)
    x = torch.randn(64, 16)
    out32, _ = layer(x)
    out16, aux16 = layer_bf16(x.bfloat16())
    assert out16.dtype == torch.bfloat16 and aux16.dtype == torch.float32
    assert layer_bf16.router.weight.dtype == torch.float32
    torch.testing.assert_close(out16.float(), out32, atol=2e-3, rtol=3e-2)
    (out16.float().sum() + aux16).backward()
    assert layer_bf16.experts.w1.grad.dtype == torch.bfloat16


def test_loss_helpers_match_written_formulas():
    probs = torch.softmax(torch.randn(10, 4), -1)
    ids = torch.topk(probs, 2).indices
    f_first = losses.expert_fractions(ids, 4, "first")
    f_all = losses.expert_fractions(ids, 4, "all")
    assert abs(f_first.sum().item() - 1) < 1e-6 and abs(f_all.sum().item() - 2) < 1e-6
    torch.testing.assert_close(losses.load_balancing_loss(probs, f_first), 4 * (f_first * probs.mean(0)).sum())


def test_plan_is_index_based_not_one_hot():
    # A [T, E, C] one-hot here would hold 50_000 * 128 * 1563 = 1e10 entries (40 GB in float32); the plan is O(T * K).
    from moe_train.models.moe.routing import capacity_plan, expert_capacity

    num_tokens, num_experts, top_k = 50_000, 128, 2
    probs_TK, ids_TK = torch.topk(torch.softmax(torch.randn(num_tokens, num_experts), -1), top_k)
    capacity = expert_capacity(num_tokens, num_experts, top_k, 2.0, 4)
    plan = capacity_plan(ids_TK, probs_TK, None, num_experts, capacity, "position", True)
    assert capacity == 1563 and plan.src_R.numel() == num_experts * capacity and plan.dest_A.numel() == 100_000


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_segmented_capacity_buffer_equals_per_row_reference(impl):
    """[E, S*C, D] buffers with S segments per expert (expert parallelism: one per source rank), each filled from
    its start: every filled row equals its expert's MLP, empty rows are zero, and weight gradients sum over
    segments."""
    from moe_train.models.moe.activations import expert_mlp
    from moe_train.models.moe.experts import GroupedExperts

    experts = GroupedExperts(3, 8, 12, "swiglu", impl).double()
    counts_ES = torch.tensor([[2, 0], [3, 1], [0, 0]])
    x = torch.randn(3, 8, 8, dtype=torch.float64)  # S=2 segments of C=4 slots
    filled = torch.zeros(3, 8, dtype=torch.bool)
    for e in range(3):
        for s in range(2):
            filled[e, s * 4:s * 4 + counts_ES[e, s]] = True
    x = x * filled[..., None]
    y = experts(x, counts_ES)
    (y * filled[..., None]).sum().backward()
    grads = [w.grad.clone() for w in (experts.w1, experts.w2, experts.w3)]
    experts.zero_grad()
    ref = torch.stack([expert_mlp(x[e], experts.w1[e], experts.w2[e], experts.w3[e], "swiglu") for e in range(3)])
    (ref * filled[..., None]).sum().backward()
    assert torch.allclose(y[filled], ref[filled]) and (impl == "grouped" or not y[~filled].any())
    for got, w in zip(grads, (experts.w1, experts.w2, experts.w3)):
        assert torch.allclose(got, w.grad)
