"""Router auxiliary losses (inputs come from the router, already float32 or wider). Both are plain differentiable
functions of the router output: the layer adds them, scaled by their coefficients, to the scalar it returns, so
their gradients reach the router through autograd.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from moe_train.models.moe.routing import count_per_group


def expert_fractions(ids_TK: torch.Tensor, num_experts: int, counting: str,
                     active_TK: torch.Tensor | None = None) -> torch.Tensor:
    """f_E: fraction of the T tokens routed to each expert (not differentiable: it counts decisions).

    counting="first": tokens whose first choice is e (GShard, DeepSpeed): sum_e f_e = 1.
    counting="all":   tokens that chose e among their k (HF Mixtral): sum_e f_e = k (minus sampled-out choices).
    """
    num_tokens = ids_TK.shape[0]
    if counting == "first":
        ids, weights = ids_TK[:, 0], torch.ones_like(ids_TK[:, 0], dtype=torch.float32)
    else:
        ids = ids_TK.reshape(-1)
        weights = torch.ones_like(ids, dtype=torch.float32) if active_TK is None else active_TK.reshape(-1).float()
    return count_per_group(ids, num_experts, weights) / max(num_tokens, 1)


def load_balancing_loss(probs_TE: torch.Tensor, fractions_E: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss  L_aux = E * sum_e f_e * P_e,  P_e = mean_t softmax(logits_t)_e.

    f_e comes from `expert_fractions` (no gradient); the gradient flows through P_e to the router logits.
    With counting="first" this is DeepSpeed's top1/top2gating `l_aux`; with counting="all" it is HF Mixtral's
    `load_balancing_loss_func`. A perfectly balanced router scores 1 (first) or k (all).
    """
    num_experts = probs_TE.shape[-1]
    mean_probs_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(fractions_E * mean_probs_E)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss  L_z = mean_t (logsumexp_e logits_te)^2: keeps the logits small for stability."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the router distribution, in nats (log E = uniform, 0 = one-hot)."""
    p = probs_TE
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=-1).mean()
