"""The MoE feed-forward layer: route (the router also plans the dispatch) -> dispatch -> experts -> combine
(+ shared experts).

Shape legend: T tokens (all leading dims of the input flattened), D model width, E experts, K experts per token.

forward(x) returns (out, aux_loss): `aux_loss` = aux_loss_coef * L_aux + z_loss_coef * L_z is a differentiable
scalar the caller adds to its loss, so the router gets its balancing gradient through autograd. Per-layer statistics
are kept as detached device tensors in `layer.last_stats`; reading them (e.g. `.tolist()`) is the caller's host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moe_train.config.moe import MoEConfig, validate_moe_config
from moe_train.models.moe import losses
from moe_train.models.moe.dispatch import LocalDispatcher
from moe_train.models.moe.activations import expert_mlp
from moe_train.models.moe.experts import GroupedExperts, to_compute_dtype
from moe_train.models.moe.router import Routing, build_router


@dataclass
class MoEStats:
    """Detached statistics of the last forward pass (device tensors: no host sync until read)."""

    tokens_per_expert: torch.Tensor  # [E] float: token-expert pairs computed per expert
    drop_frac: torch.Tensor  # fraction of routed pairs dropped by capacity
    router_entropy: torch.Tensor  # mean per-token router entropy, nats
    aux_loss: torch.Tensor  # unscaled load-balancing loss L_aux
    z_loss: torch.Tensor  # unscaled router z-loss L_z
    capacity: Optional[int]  # C, or None when dropless
    choices_E: Optional[torch.Tensor]  # [E] float: pairs the router chose per expert before capacity (the load of
    # the balancing bias); None when the router has no bias


class SharedExperts(nn.Module):
    """Always-active dense MLP of width num_shared_experts * d_ff (DeepSeekMoE shared experts)."""

    def __init__(self, d_model: int, d_hidden: int, activation: str, dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.dropout = dropout  # on the hidden activations, training only (moe.expert_dropout)
        self.w1 = nn.Parameter(torch.empty(d_hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w3 = nn.Parameter(torch.empty(d_hidden, d_model)) if activation == "swiglu" else None
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(w, std=std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return expert_mlp(x_TD, self.w1, self.w2, self.w3, self.activation, self.dropout if self.training else 0.0)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, cfg: MoEConfig, dispatcher: Optional[LocalDispatcher] = None):
        super().__init__()
        validate_moe_config(cfg, d_model)
        if cfg.second_expert_policy == "sampling" and cfg.dropless:
            raise ValueError("moe.second_expert_policy='sampling' saves capacity, which dropless routing "
                             "(moe.capacity_factor=-1) does not have; use a positive capacity_factor or policy 'all'")
        self.cfg = cfg
        self.d_model = d_model
        self.router = build_router(d_model, cfg)
        self.experts = GroupedExperts(cfg.num_experts, d_model, cfg.d_ff, cfg.activation, cfg.expert_impl,
                                      cfg.expert_dropout)
        self.shared_experts = self.build_shared_experts(d_model, cfg)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.last_stats: Optional[MoEStats] = None

    @staticmethod
    def build_shared_experts(d_model: int, cfg: MoEConfig) -> Optional[SharedExperts]:
        if cfg.num_shared_experts == 0:
            return None
        return SharedExperts(d_model, cfg.num_shared_experts * cfg.d_ff, cfg.activation, cfg.expert_dropout)

    def init_weights(self, std: float = 0.02) -> None:
        for module in (self.router, self.experts, self.shared_experts):
            if module is not None:
                module.init_weights(std)

    def forward(self, x: torch.Tensor, task_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D]; task_ids [...] (x's leading shape): each token's task, for moe.router_input task /
        token_and_task (ignored by token routing)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"MoE input width x.shape[-1]={x.shape[-1]} does not match d_model={self.d_model}")
        x_TD = x.reshape(-1, self.d_model)
        route = self.router(x_TD, task_ids)  # float32 (the router upcasts a 16-bit x itself)
        plan = route.plan  # the router's own plan: token choice (capacity or dropless) or expert choice
        # Dispatched rows (and the all-to-all under expert parallelism) carry the compute dtype: bf16 under autocast,
        # half the bytes of the float32 RMSNorm output. The combine accumulates in float32 (weights_A is float32) and
        # returns x's dtype (the residual stream's).
        batch = self.dispatcher.dispatch(to_compute_dtype(x_TD), plan)
        out_TD = self.dispatcher.combine(self.experts(batch.x, batch.counts), plan, batch).to(x.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        seq_len = x.shape[-2] if x.dim() > 2 else x_TD.shape[0]  # [B, S, D] inputs; a [T, D] input is one sequence
        aux_loss, lb_loss, z_loss = self.router_losses(route, seq_len)
        self.last_stats = self.collect_stats(route, lb_loss, z_loss)
        return out_TD.view(x.shape), aux_loss

    def router_losses(self, route: Routing,
                      seq_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux_loss_coef * L_aux + z_loss_coef * L_z, L_aux, L_z); see losses.py for the formulas. seq_len: the
        tokens of one sequence (moe.aux_loss_scope=sequence); None = all T tokens are one sequence."""
        cfg = self.cfg
        seq_len = seq_len if seq_len is not None else route.logits_TE.shape[0]
        lb_loss = losses.scoped_balancing_loss(route.probs_TE, route.counted_TE, cfg.aux_loss_scope, seq_len,
                                               self.dispatcher.batch_sum)
        z_loss = losses.router_z_loss(route.logits_TE)
        return cfg.aux_loss_coef * lb_loss + cfg.z_loss_coef * z_loss, lb_loss, z_loss

    @staticmethod
    @torch.no_grad()
    def collect_stats(route: Routing, lb_loss, z_loss) -> MoEStats:
        plan = route.plan
        return MoEStats(plan.counts_E.float(), plan.drop_fraction(), losses.router_entropy(route.probs_TE),
                        lb_loss.detach(), z_loss.detach(), plan.capacity, route.choices_E)
