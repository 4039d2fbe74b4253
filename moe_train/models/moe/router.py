"""Learned token routers: softmax top-k, Switch top-1, GShard top-2 with a sampled second expert, noisy top-k
gating (Shazeer et al. 2017) and Switch input jitter.

Shape legend: T tokens, D model width, E experts, K experts per token.

All router math is at least float32 whatever the model dtype (float64 stays float64, for gradcheck). Randomness
(jitter, noise, second-expert sampling) draws from the global torch RNG, so a run seeded with torch.manual_seed is reproducible; it is active in training mode only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config.moe import MoEConfig


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit models (routing decisions are sensitive to rounding), float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


class _UpcastLinear(torch.autograd.Function):
    """x W^T in W's dtype (>= float32) for a 16-bit x, saving x in its own dtype for backward. Plain autograd over
    `F.linear(x.float(), W)` keeps the float32 copy of x alive until backward (64 MiB at 32k tokens x 512); here it
    is transient, and the weight gradient upcasts x in chunks of CHUNK rows."""

    CHUNK = 4096

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, w_ED)
        return F.linear(x_TD.to(w_ED.dtype), w_ED)

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor):
        x_TD, w_ED = ctx.saved_tensors
        grad_x = (grad_TE @ w_ED).to(x_TD.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(w_ED)
            for start in range(0, x_TD.shape[0], _UpcastLinear.CHUNK):
                rows = slice(start, start + _UpcastLinear.CHUNK)
                grad_w.addmm_(grad_TE[rows].t(), x_TD[rows].to(w_ED.dtype))
        return grad_x, grad_w


def router_linear(x_TD: torch.Tensor, w_ED: torch.Tensor) -> torch.Tensor:
    """Router logits x W^T in router_dtype(x) (the router weight is kept in float32 or float64)."""
    w_ED = w_ED.to(router_dtype(x_TD))
    if x_TD.dtype == w_ED.dtype:
        return F.linear(x_TD, w_ED)
    return _UpcastLinear.apply(x_TD, w_ED)


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # >= float32 router logits (after noise, if any)
    probs_TE: torch.Tensor  # >= float32 softmax(logits_TE)
    ids_TK: torch.Tensor  # int64 chosen experts, best first
    probs_TK: torch.Tensor  # >= float32 softmax probability of each chosen expert (not renormalised)
    active_TK: Optional[torch.Tensor]  # bool; None = every choice dispatched (no second-expert sampling)


class TopKRouter(nn.Module):
    """logits = x W^T (float32), probs = softmax(logits), keep the k most probable experts per token."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.jitter_eps = cfg.jitter_eps
        self.sample_second = cfg.second_expert_policy == "sampling"
        self.router_input = cfg.router_input
        # Kept in float32 like DeepSpeed's TopKGate.wg; routing decisions are sensitive to rounding.
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model, dtype=torch.float32))
        # A learned task embedding in the router's input space (moe.router_input task / token_and_task).
        self.task_embedding = None
        if cfg.router_input != "token":
            self.task_embedding = nn.Parameter(torch.empty(cfg.num_tasks, d_model, dtype=torch.float32))
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if getattr(self, "task_embedding", None) is not None:
            nn.init.normal_(self.task_embedding, std=std)

    def router_in(self, x_TD: torch.Tensor, task_T: Optional[torch.Tensor]) -> torch.Tensor:
        """The vector the router's linear map sees: the token's hidden state, its task's embedding, or their sum."""
        if self.router_input == "token":
            return x_TD
        if task_T is None:
            raise ValueError(f"moe.router_input={self.router_input!r} needs task ids with the tokens: data=chat "
                             f"(records' \"task\") or data.task_of_domain=true (the embedded corpus's domains)")
        task_TD = self.task_embedding[task_T.reshape(-1)]  # [T, D]
        if self.router_input == "task":
            return task_TD
        return x_TD.to(task_TD.dtype) + task_TD

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter_eps > 0:
            # Switch Transformer jitter: multiplicative noise on the router input only.
            x32_TD = x_TD.to(router_dtype(x_TD))
            x_TD = x32_TD * torch.empty_like(x32_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return router_linear(x_TD, self.weight)

    def forward(self, x_TD: torch.Tensor, task_T: Optional[torch.Tensor] = None) -> RouterOutput:
        """task_T: int64 [T] task id per token (router_input task / token_and_task); ignored for token routing."""
        with torch.autocast(x_TD.device.type, enabled=False):  # router math stays >= float32 under autocast
            return self.route(self.router_in(x_TD, task_T))

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.compute_logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        probs_TK, ids_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        active_TK = self.sample_second_expert(probs_TK) if self.training and self.sample_second else None
        return RouterOutput(logits_TE, probs_TE, ids_TK, probs_TK, active_TK)

    @staticmethod
    def sample_second_expert(probs_TK: torch.Tensor) -> torch.Tensor:
        """GShard random routing: keep the second expert with probability min(1, 2 * g2), g2 = p2 / (p1 + p2)."""
        g2_T = probs_TK[:, 1] / (probs_TK[:, 0] + probs_TK[:, 1]).clamp_min(torch.finfo(probs_TK.dtype).eps)
        keep2_T = 2.0 * g2_T.detach() > torch.rand_like(g2_T)
        first_T = torch.ones_like(keep2_T)
        return torch.stack([first_T, keep2_T], dim=-1)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017): H(x) = x W_g + N(0, 1) * softplus(x W_noise) in training.

    W_noise is trainable and starts at zero (noise std softplus(0) = 0.69); without `renormalize` the weights are the
    full-softmax probabilities, with it they equal Shazeer's softmax over the k kept noisy logits.
    """

    zero_init = ("noise_weight",)  # models/init.py: the noise starts at softplus(0)

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__(d_model, cfg)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, d_model, dtype=torch.float32))

    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = super().compute_logits(x_TD)
        if not self.training:
            return logits_TE
        noise_std_TE = F.softplus(router_linear(x_TD, self.noise_weight))
        return logits_TE + torch.randn_like(logits_TE) * noise_std_TE


ROUTER_CLASSES = {"topk": TopKRouter, "noisy_topk": NoisyTopKRouter}


def build_router(d_model: int, cfg: MoEConfig) -> TopKRouter:
    return ROUTER_CLASSES[cfg.router](d_model, cfg)
