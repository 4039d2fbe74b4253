"""Learned routers: softmax or sigmoid top-k, Switch top-1, GShard top-2 with a sampled second expert, noisy top-k
gating (Shazeer et al. 2017), Switch input jitter, aux-loss-free balancing bias (DeepSeek-V3) and expert choice
(Zhou et al. 2022). Each router turns its decisions into its own dispatch plan (routing.py), so the MoE layer and
its dispatchers never assume how tokens and experts were matched.

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
from moe_train.models.moe.losses import counted_choices
from moe_train.models.moe.routing import (DispatchPlan, TokenChoicePlan, capacity_plan, count_per_group,
                                          dropless_plan, expert_capacity, expert_choice_plan)


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
class Routing:
    """A router's decisions, the dispatch plan that carries them out, and what the losses and statistics need."""

    logits_TE: torch.Tensor  # >= float32 router logits (after noise, if any)
    probs_TE: torch.Tensor  # >= float32 distribution over experts: softmax, or sigmoid scores normalised per token
    plan: DispatchPlan  # built by the router for its own decisions (routing.py)
    counted_TE: torch.Tensor  # float32 1 where the load-balancing loss counts token t for expert e (its f_e)
    choices_E: Optional[torch.Tensor]  # float32 pairs chosen per expert before capacity, the load aux-loss-free
    # balancing reads: counted only when the router has a balancing bias (None otherwise)
    ids_TK: Optional[torch.Tensor] = None  # token choice: int64 chosen experts, best first
    probs_TK: Optional[torch.Tensor] = None  # token choice: score of each chosen expert (not renormalised)
    active_TK: Optional[torch.Tensor] = None  # token choice, bool; None = every choice dispatched


class TopKRouter(nn.Module):
    """logits = x W^T (float32), scores = softmax or sigmoid(logits), keep the k best-scoring experts per token (by
    score + the balancing bias, when moe.bias_update_rate > 0), and plan their dispatch."""

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.jitter_eps = cfg.jitter_eps
        self.sample_second = cfg.second_expert_policy == "sampling"
        self.router_input = cfg.router_input
        # (eval, training) capacity factors as exact integer ratios; capacity_factor() divides them back into the same
        # floats. torch.compile specialises the ints a module holds, but a float whose value differs between two
        # compiles of this code in one process (a `-m` sweep over moe.capacity_factor) turns symbolic, and capacity
        # sizes derived from it cannot enter the scatter-free gathers' autograd.Function (torch: "Source of ... is
        # None when lifting it to input of top-level").
        self.capacity_ratios = tuple(float(f).as_integer_ratio() for f in (cfg.eval_capacity_factor,
                                                                           cfg.capacity_factor))
        # Kept in float32 like DeepSpeed's TopKGate.wg; routing decisions are sensitive to rounding.
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model, dtype=torch.float32))
        # A learned task embedding in the router's input space (moe.router_input task / token_and_task).
        self.task_embedding = None
        if cfg.router_input != "token":
            self.task_embedding = nn.Parameter(torch.empty(cfg.num_tasks, d_model, dtype=torch.float32))
        # Aux-loss-free balancing: not a parameter (no gradient); the trainer updates it after each optimizer step
        # (training/expert_bias.py) and checkpoints save it with the weights.
        bias = torch.zeros(cfg.num_experts, dtype=torch.float32) if cfg.bias_update_rate > 0 else None
        self.register_buffer("expert_bias", bias)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if getattr(self, "task_embedding", None) is not None:
            nn.init.normal_(self.task_embedding, std=std)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        if getattr(self, "expert_bias", None) is not None:
            self.expert_bias.zero_()

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

    def forward(self, x_TD: torch.Tensor, task_T: Optional[torch.Tensor] = None) -> Routing:
        """task_T: int64 [T] task id per token (router_input task / token_and_task); ignored for token routing."""
        with torch.autocast(x_TD.device.type, enabled=False):  # router math stays >= float32 under autocast
            return self.route(self.router_in(x_TD, task_T))

    def scores(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores_TE that gate the experts, probs_TE: the per-token distribution the losses and statistics use)."""
        if self.cfg.score_func == "softmax":
            probs_TE = torch.softmax(logits_TE, dim=-1)
            return probs_TE, probs_TE
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def route(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = self.scores(logits_TE)
        return self.token_choice(logits_TE, scores_TE, probs_TE)

    def token_choice(self, logits_TE, scores_TE, probs_TE) -> Routing:
        if self.expert_bias is None:
            probs_TK, ids_TK = torch.topk(scores_TE, self.top_k, dim=-1)
        else:  # the bias picks the experts; the gates stay the unbiased scores (DeepSeek-V3)
            ids_TK = torch.topk(scores_TE.detach() + self.expert_bias, self.top_k, dim=-1).indices
            probs_TK = scores_TE.gather(1, ids_TK)
        active_TK = self.sample_second_expert(probs_TK) if self.training and self.sample_second else None
        plan = self.token_choice_plan(ids_TK, probs_TK, active_TK)
        counted_TE = counted_choices(ids_TK, self.num_experts, self.cfg.aux_loss_counting, active_TK)
        return Routing(logits_TE, probs_TE, plan, counted_TE, self.choices(ids_TK, active_TK), ids_TK, probs_TK,
                       active_TK)

    def choices(self, ids_TK: torch.Tensor, active_TK: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[E] float32 active choices per expert, for the bias update; None (not counted) without a bias."""
        if self.expert_bias is None:
            return None
        weights_A = None if active_TK is None else active_TK.reshape(-1).float()
        return count_per_group(ids_TK.reshape(-1), self.num_experts, weights_A).float()

    def token_choice_plan(self, ids_TK, probs_TK, active_TK) -> TokenChoicePlan:
        """Capacity (moe.capacity_factor, or eval_capacity_factor in eval mode) or dropless plan of the choices."""
        cfg = self.cfg
        capacity_factor = self.capacity_factor()
        if capacity_factor < 0:
            return dropless_plan(ids_TK, probs_TK, cfg.num_experts, cfg.renormalize, cfg.routed_scale)
        capacity = expert_capacity(ids_TK.shape[0], cfg.num_experts, cfg.top_k, capacity_factor, cfg.min_capacity)
        return capacity_plan(ids_TK, probs_TK, active_TK, cfg.num_experts, capacity, cfg.drop_policy,
                             cfg.renormalize, cfg.routed_scale)

    def capacity_factor(self) -> float:
        """moe.capacity_factor in training, moe.eval_capacity_factor in eval mode (negative: dropless)."""
        num, den = self.capacity_ratios[self.training]
        return num / den

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


class ExpertChoiceRouter(TopKRouter):
    """Expert choice (Zhou et al. 2022) in training: expert e takes the C tokens of the micro-batch with the highest
    scores[:, e], C = expert_capacity(T, E, top_k, capacity_factor) (top-k token choice's compute at capacity
    factor 1); a token gets 0..E experts, every expert is full, and nothing needs a balancing loss (f_e = C / T
    for every e, so the Switch loss is a constant). Each rank chooses among its own tokens.

    Not causal: whether token t is picked depends on the scores of the other tokens of the micro-batch, later
    positions included, which a decoder cannot see at generation time. In eval mode (validation, generation)
    this router therefore routes by token choice: each token's top_k experts by the same scores, at
    eval_capacity_factor, which is what a causal decoder can run; docs/ROUTING.md measures the gap."""

    def route(self, x_TD: torch.Tensor) -> Routing:
        if not self.training:
            return super().route(x_TD)
        cfg = self.cfg
        logits_TE = self.compute_logits(x_TD)
        scores_TE, probs_TE = self.scores(logits_TE)
        capacity = expert_capacity(x_TD.shape[0], cfg.num_experts, cfg.top_k, self.capacity_factor(),
                                   cfg.min_capacity)
        plan = expert_choice_plan(scores_TE, capacity, cfg.routed_scale)
        expert_R = torch.arange(cfg.num_experts, device=x_TD.device).repeat_interleave(plan.capacity)
        counted_TE = torch.zeros(probs_TE.shape, dtype=torch.float32, device=x_TD.device)
        counted_TE.index_put_((plan.src_R, expert_R), counted_TE.new_ones(()))
        return Routing(logits_TE, probs_TE, plan, counted_TE, None)  # no bias: expert choice is balanced


ROUTER_CLASSES = {"topk": TopKRouter, "noisy_topk": NoisyTopKRouter, "expert_choice": ExpertChoiceRouter}


def build_router(d_model: int, cfg: MoEConfig) -> TopKRouter:
    return ROUTER_CLASSES[cfg.router](d_model, cfg)
