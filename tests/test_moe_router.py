"""Router variants: noise and jitter only in training and reproducible from the seed, GShard second-expert sampling,
probability drop policy, float32 router math."""

from __future__ import annotations

import pytest
import torch

from helpers import make_layer, routing_of


def _logits(layer, x, seed):
    torch.manual_seed(seed)
    return layer.router(x).logits_TE


def test_noisy_topk_noise_is_trainable_training_only_and_seeded():
    layer = make_layer(router="noisy_topk")
    x = torch.randn(20, 16)
    clean = torch.nn.functional.linear(x, layer.router.weight)
    layer.eval()
    torch.testing.assert_close(layer.router(x).logits_TE, clean)
    layer.train()
    a, b = _logits(layer, x, 1), _logits(layer, x, 1)
    torch.testing.assert_close(a, b)  # same seed, same noise
    assert not torch.allclose(a, clean) and not torch.allclose(a, _logits(layer, x, 2))
    out, aux = layer(x)
    out.sum().backward()
    assert layer.router.noise_weight.grad is not None and layer.router.noise_weight.grad.abs().sum() > 0


def test_jitter_scales_router_input_in_training_only():
    layer = make_layer(jitter_eps=0.1)
    x = torch.randn(50, 16)
    clean = torch.nn.functional.linear(x, layer.router.weight)
    layer.eval()
    torch.testing.assert_close(layer.router(x).logits_TE, clean)
    layer.train()
    torch.manual_seed(3)
    noise = torch.empty_like(x).uniform_(0.9, 1.1)
    torch.testing.assert_close(_logits(layer, x, 3), torch.nn.functional.linear(x * noise, layer.router.weight))


def test_gshard_second_expert_sampling():
    layer = make_layer(top_k=2, second_expert_policy="sampling", capacity_factor=4.0)
    torch.nn.init.normal_(layer.router.weight, std=0.3)
    x = torch.randn(4000, 16)
    torch.manual_seed(5)
    route, plan = routing_of(layer, x)
    active = route.active_TK
    assert bool(active[:, 0].all())
    g2 = route.probs_TK[:, 1] / route.probs_TK.sum(-1)
    expected_kept = torch.clamp(2 * g2, max=1).mean().item()
    assert abs(active[:, 1].float().mean().item() - expected_kept) < 0.03
    # switched-off second choices take no capacity and get zero weight; the first choice then carries weight 1
    weights_TK = plan.weights_A.view(2, -1).t()
    assert bool((weights_TK[~active[:, 1], 1] == 0).all())
    torch.testing.assert_close(weights_TK[~active[:, 1], 0], torch.ones(int((~active[:, 1]).sum())))
    assert plan.counts_E.sum().item() == int(active.sum())
    layer.eval()
    assert layer.router(x).active_TK is None  # deterministic at eval


def test_probability_drop_policy_keeps_most_probable_pairs():
    layer = make_layer(num_experts=2, top_k=1, capacity_factor=0.5, min_capacity=0, drop_policy="probability",
                       renormalize=False)
    x = torch.randn(40, 16)
    route, plan = routing_of(layer, x)
    for e in range(2):
        mine = (route.ids_TK[:, 0] == e)
        probs = route.probs_TK[:, 0][mine]
        kept = plan.kept_A[mine]
        if bool((~kept).any()):
            assert probs[kept].min() >= probs[~kept].max()
        assert int(kept.sum()) == min(int(mine.sum()), plan.capacity)


def test_position_policy_keeps_first_choices_before_second_choices():
    layer = make_layer(num_experts=2, top_k=2, capacity_factor=0.5, min_capacity=0)  # C = 10 of 40 pairs
    route, plan = routing_of(layer, torch.randn(20, 16))
    kept_TK = plan.kept_A.view(2, -1).t()
    for e in range(2):
        first = (route.ids_TK[:, 0] == e).nonzero().flatten()
        assert kept_TK[first[:10], 0].all() and not kept_TK[first[10:], 0].any()


def test_router_math_is_float32_for_bfloat16_models():
    layer = make_layer(dtype=torch.bfloat16)
    layer.router.float()
    route = layer.router(torch.randn(8, 16, dtype=torch.bfloat16))
    assert route.logits_TE.dtype == route.probs_TK.dtype == torch.float32


def test_eval_capacity_factor_is_used_in_eval_mode():
    layer = make_layer(num_experts=4, top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    x = torch.randn(40, 16)
    assert routing_of(layer, x)[1].capacity == 10
    layer.eval()
    assert routing_of(layer, x)[1].capacity == 20


@pytest.mark.parametrize("chunk", [3, 4096])
def test_bf16_router_linear_matches_float32_autograd_and_saves_bf16_input(chunk, monkeypatch):
    from moe_train.models.moe.router import _UpcastLinear, router_linear

    monkeypatch.setattr(_UpcastLinear, "CHUNK", chunk)
    x = torch.randn(10, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 16, requires_grad=True)
    g = torch.randn(10, 4)
    out = router_linear(x, w)
    assert out.grad_fn.saved_tensors[0].dtype == torch.bfloat16  # the float32 copy is not kept for backward
    (out * g).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref.float(), w_ref)
    (ref * g).sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, x_ref.grad)
    assert torch.allclose(w.grad, w_ref.grad, rtol=1e-5, atol=1e-5)
