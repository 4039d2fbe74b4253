"""Per-expert statistics of a trained MoE on calibration batches, for pruning and merging (moe_train.serving.compress).

Shape legend: T tokens, D model width, E experts, K experts per token.

Every MoE layer's input (the normalised hidden state) is captured by a forward pre-hook while the model runs the
calibration batches in eval mode; the statistics are computed from it with the layer's own router and weights, one
expert at a time over all T tokens (E x the cost of one expert: calibration runs once, on few batches):

- `counts_E`: token-expert pairs routed to each expert (top-k choices) - "frequency" (MC-SMoE, prune-frequency).
- `reap_E`: REAP's saliency (arXiv 2510.13999, eq. 9), the mean over the tokens routed to expert e of
  g_e(x) * ||f_e(x)||_2, g the gate weight the combine uses (renormalised when the layer renormalises).
- `mean_out_ED`: every expert's output averaged over *all* calibration tokens, routed or not - the feature HC-SMoE
  (arXiv 2410.08589) clusters experts by, independent of the routing decisions.
- `logit_gram_EE`: sum over tokens of the router logits' outer product; cosine(column i, column j) is MC-SMoE's
  router-logit similarity of experts i and j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from moe_train.models.moe.activations import expert_mlp
from moe_train.models.moe.layer import MoELayer


@dataclass
class ExpertStats:
    counts_E: torch.Tensor  # float64 token-expert pairs
    reap_sum_E: torch.Tensor  # float64 sum of g * ||f|| over the routed pairs
    out_sum_ED: torch.Tensor  # float64 sum of f_e(x) over all tokens
    logit_gram_EE: torch.Tensor  # float64 sum over tokens of logits_E logits_E^T
    tokens: int = 0

    @classmethod
    def zeros(cls, num_experts: int, d_model: int) -> "ExpertStats":
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)  # noqa: E731
        return cls(z(num_experts), z(num_experts), z(num_experts, d_model), z(num_experts, num_experts))

    @property
    def reap_E(self) -> torch.Tensor:
        return self.reap_sum_E / self.counts_E.clamp_min(1.0)

    @property
    def mean_out_ED(self) -> torch.Tensor:
        return self.out_sum_ED / max(self.tokens, 1)

    def logit_similarity(self) -> torch.Tensor:
        """[E, E] cosine similarity of the experts' router-logit columns over the calibration tokens."""
        norms_E = self.logit_gram_EE.diagonal().clamp_min(1e-30).sqrt()
        return self.logit_gram_EE / torch.outer(norms_E, norms_E)


def gate_weights(probs_TK: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """The combine weights of the chosen experts (up to routed_scale, which does not change a ranking)."""
    return probs_TK / probs_TK.sum(-1, keepdim=True) if renormalize else probs_TK


@torch.no_grad()
def accumulate(stats: ExpertStats, layer: MoELayer, x_TD: torch.Tensor, task_T: Optional[torch.Tensor] = None,
               only_task: Optional[int] = None) -> None:
    """Add one batch of layer inputs to `stats` (host syncs: the float64 sums are moved to the CPU per batch); with
    `only_task`, only the tokens of that task count."""
    if only_task is not None:
        keep_T = task_T.reshape(-1) == only_task
        x_TD, task_T = x_TD[keep_T], task_T.reshape(-1)[keep_T]
    route = layer.router(x_TD, task_T)
    weights_TK = gate_weights(route.probs_TK, layer.cfg.renormalize)
    experts = layer.experts
    for e in range(experts.num_experts):
        w3 = experts.w3[e] if experts.w3 is not None else None
        out_TD = expert_mlp(x_TD, experts.w1[e], experts.w2[e], w3, experts.activation).double()
        chosen_TK = route.ids_TK == e
        token_T = chosen_TK.any(-1)
        gate_T = (weights_TK * chosen_TK).sum(-1).double()
        stats.counts_E[e] += chosen_TK.sum().item()
        stats.reap_sum_E[e] += (gate_T[token_T] * out_TD[token_T].norm(dim=-1)).sum().item()
        stats.out_sum_ED[e] += out_TD.sum(0).cpu()
    logits_TE = route.logits_TE.double()
    stats.logit_gram_EE += (logits_TE.t() @ logits_TE).cpu()
    stats.tokens += x_TD.shape[0]


def moe_layers(model: nn.Module) -> dict[str, MoELayer]:
    """Qualified name -> MoE layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[tuple], device: torch.device,
              only_task: Optional[int] = None) -> dict[str, ExpertStats]:
    """ExpertStats of every MoE layer of `model` (put in eval mode) over the batches (inputs [B, S], targets[, task
    ids [B, S]]); with `only_task`, over the tokens of that task."""
    model.eval()
    layers = moe_layers(model)
    stats = {name: ExpertStats.zeros(layer.cfg.num_experts, layer.d_model) for name, layer in layers.items()}

    def hook_for(name: str, layer: MoELayer):
        def hook(module, args):
            task_T = args[1] if len(args) > 1 else None
            accumulate(stats[name], layer, args[0].reshape(-1, layer.d_model), task_T, only_task)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name, layer)) for name, layer in layers.items()]
    try:
        for inputs, _, *task_ids in batches:
            model(inputs.to(device), task_ids_BS=task_ids[0].to(device) if task_ids else None)
    finally:
        for handle in handles:
            handle.remove()
    return stats
