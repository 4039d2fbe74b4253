"""Our layer equals transformers' Mixtral sparse MoE block (and its load-balancing loss) with copied weights."""

from __future__ import annotations

import pytest
import torch

from helpers import forward_backward, make_layer, routing_of

mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
from transformers import MixtralConfig  # noqa: E402

E, K, D, F = 8, 2, 32, 48


def build_pair(num_tokens_seed: int = 0):
    torch.manual_seed(num_tokens_seed)
    hf = mixtral.MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                                     num_experts_per_tok=K, router_jitter_noise=0.0))
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = make_layer(d_model=D, num_experts=E, top_k=K, d_ff=F, capacity_factor=-1.0, eval_capacity_factor=-1.0,
                      renormalize=True, aux_loss_coef=0.0)
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.experts.w1.copy_(hf.experts.gate_up_proj[:, :F])  # gate_up_proj [E, 2F, D] = [w1; w3]
        ours.experts.w3.copy_(hf.experts.gate_up_proj[:, F:])
        ours.experts.w2.copy_(hf.experts.down_proj)  # [E, D, F]
    return hf, ours


@pytest.mark.parametrize("num_tokens", [1, 37, 256])
@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_equals_hf_mixtral_block_forward_and_gradients(num_tokens, impl):
    hf, ours = build_pair()
    ours.experts.impl = impl
    x = torch.randn(1, num_tokens, D)
    upstream = torch.randn(1, num_tokens, D)
    out, _, gx, grads = forward_backward(ours, x, upstream)

    xh = x.clone().requires_grad_(True)
    (hf(xh) * upstream).sum().backward()
    out_hf = hf(x)
    torch.testing.assert_close(out, out_hf.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, xh.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["router.weight"], hf.gate.weight.grad, atol=1e-5, rtol=1e-4)
    gate_up = hf.experts.gate_up_proj.grad
    torch.testing.assert_close(grads["experts.w1"], gate_up[:, :F], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["experts.w3"], gate_up[:, F:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads["experts.w2"], hf.experts.down_proj.grad, atol=1e-5, rtol=1e-4)


def test_aux_loss_counting_all_equals_hf_load_balancing_loss():
    _, ours = build_pair()
    ours.cfg.aux_loss_counting = "all"
    x = torch.randn(37, D)
    route, _ = routing_of(ours, x)
    expected = mixtral.load_balancing_loss_func((route.logits_TE,), E, K)
    torch.testing.assert_close(ours.router_losses(route)[1], expected)
