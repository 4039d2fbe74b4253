"""Router auxiliary losses (inputs come from the router, already float32 or wider). Both are plain differentiable
functions of the router output: the layer adds them, scaled by their coefficients, to the scalar it returns, so
their gradients reach the router through autograd.

Shape legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def expert_fractions(ids_TK: torch.Tensor, num_experts: int, counting: str,
                     active_TK: torch.Tensor | None = None) -> torch.Tensor:
    """f_E: fraction of the T tokens routed to each expert (not differentiable: it counts decisions).

    counting="first": tokens whose first choice is e (GShard, DeepSpeed): sum_e f_e = 1.
    counting="all":   tokens that chose e among their k (HF Mixtral): sum_e f_e = k (minus sampled-out choices).
    """
    return counted_choices(ids_TK, num_experts, counting, active_TK).mean(dim=0)


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


def counted_choices(ids_TK: torch.Tensor, num_experts: int, counting: str,
                    active_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, E] float32: 1 where the load-balancing loss counts token t for expert e. counting="first": the first
    choice only (GShard, DeepSpeed); "all": every active choice (HF Mixtral). A scatter, not F.one_hot (which
    checks its ids on the host: a sync on CUDA)."""
    counted_TE = torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.float32, device=ids_TK.device)
    if counting == "first":
        return counted_TE.scatter_(1, ids_TK[:, :1], 1.0)
    ones_TK = torch.ones_like(ids_TK, dtype=torch.float32) if active_TK is None else active_TK.float()
    return counted_TE.scatter_add_(1, ids_TK, ones_TK)


def scoped_balancing_loss(probs_TE: torch.Tensor, counted_TE: torch.Tensor, scope: str, seq_len: int,
                          batch_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The Switch loss E * sum_e f_e * P_e with f_e (counted_TE's share) and P_e (mean probs_TE) taken over:
    `micro_batch`: all T tokens; `sequence`: each run of seq_len tokens, the T / seq_len losses averaged
    (DeepSeek-V3's sequence-wise loss); `global_batch`: f_e over every data-parallel rank's tokens (batch_sum: the
    dispatcher's sum of [E + 1] counts over those ranks; a collective), P_e over this rank's (its gradient is local;
    averaged over the ranks, the gradients equal one process's over the whole batch)."""
    num_tokens, num_experts = probs_TE.shape
    if scope == "sequence":
        f_BE = counted_TE.view(-1, seq_len, num_experts).mean(dim=1)
        p_BE = probs_TE.view(-1, seq_len, num_experts).mean(dim=1)
        return num_experts * (f_BE * p_BE).sum(dim=-1).mean()
    if scope == "global_batch":
        counts = torch.cat([counted_TE.sum(dim=0), counted_TE.new_full((1,), num_tokens)])
        counts = batch_sum(counts)  # collective under data parallelism
        return load_balancing_loss(probs_TE, counts[:num_experts] / counts[num_experts])
    return load_balancing_loss(probs_TE, counted_TE.mean(dim=0))
