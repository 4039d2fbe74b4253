"""From router decisions to a dispatch plan: which token fills which expert-input row, which expert-output row each
token-expert pair reads back, and with what weight. Index-based: no [T, E, C] one-hot tensor is ever built
(the GShard/fairseq einsum formulation costs O(k * cf * T^2) memory); every step here is O(T * K log(T * K)).

Shape legend:
  T tokens, D model width, E experts, K experts per token, C capacity (slots per expert),
  A = K * T token-expert pairs ("assignments"), flattened choice-major: a = k * T + t, so all first choices come
    before all second choices, as in GShard and DeepSpeed,
  R rows of expert input: E * C in capacity mode, A in dropless mode.

No host sync: the capacity C depends only on T, so every tensor here has a static shape. Counting is a scatter-add
into [E] zeros, never `torch.bincount`: on CUDA bincount reads the largest id back to the host to size its output
(a blocking sync per call), and its data-dependent shape breaks compiled graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class DispatchPlan:
    num_tokens: int  # T
    num_experts: int  # E
    top_k: int  # K
    capacity: Optional[int]  # C; None in dropless mode
    src_R: torch.Tensor  # int64: token feeding each expert-input row; T names the zero pad row (empty slot)
    pair_R: torch.Tensor  # int64: pair (a = k * T + t) feeding each row; A for an empty slot (the inverse map)
    dest_A: torch.Tensor  # int64: expert-output row each pair reads back (0 where dropped: its weight is 0)
    weights_A: torch.Tensor  # float32 combine weight per pair, 0 where dropped; differentiable (router gradient)
    counts_E: torch.Tensor  # int64 pairs computed per expert (after dropping)
    kept_A: torch.Tensor  # bool: pair computed
    active_A: torch.Tensor  # bool: pair chosen by the router (second-expert sampling may switch one off)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(ceil(T / E * (cf * k)), min_capacity), evaluated in DeepSpeed's order so rounding matches its gating."""
    return max(math.ceil(num_tokens / num_experts * (capacity_factor * top_k)), min_capacity)


def count_per_group(group_N: torch.Tensor, num_groups: int, weights_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[num_groups] occurrences of each id in group_N (int64), or the sum of weights_N per id (weights' dtype).
    Sync-free, static shape (a scatter-add); ids must lie in [0, num_groups)."""
    if weights_N is None:
        weights_N = torch.ones_like(group_N)
    counts_G = torch.zeros(num_groups, dtype=weights_N.dtype, device=group_N.device)
    return counts_G.scatter_add_(0, group_N, weights_N)


def flatten_choices(t_TK: torch.Tensor) -> torch.Tensor:
    """[T, K] -> [A] choice-major (all first choices, then all second choices, ...)."""
    return t_TK.t().reshape(-1)


def priority_order(group_A: torch.Tensor, probs_A: torch.Tensor, policy: str) -> torch.Tensor:
    """Permutation that groups pairs by expert; within a group the most important pair comes first.

    `position`: choice-major order (first choices before second choices, earlier tokens first);
    `probability`: highest router probability first, ties broken by that same position order.
    """
    if policy == "position":
        return torch.argsort(group_A, stable=True)
    by_prob_A = torch.argsort(probs_A.detach(), descending=True, stable=True)
    return by_prob_A[torch.argsort(group_A[by_prob_A], stable=True)]


def rank_in_group(group_A: torch.Tensor, order_A: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each pair inside its group under `order_A`, and the group sizes [num_groups]."""
    counts_G = count_per_group(group_A, num_groups)
    starts_G = torch.cumsum(counts_G, dim=0) - counts_G
    sorted_rank = torch.arange(group_A.numel(), device=group_A.device) - starts_G[group_A[order_A]]
    rank_A = torch.empty_like(sorted_rank)
    rank_A[order_A] = sorted_rank
    return rank_A, counts_G


def combine_weights(probs_A: torch.Tensor, kept_A: torch.Tensor, top_k: int, renormalize: bool,
                    scale: float = 1.0) -> torch.Tensor:
    """Router probability of each kept pair, optionally renormalised over the token's kept pairs (GShard, DeepSpeed
    and fairseq renormalise after dropping; with nothing dropped this equals Mixtral's top-k renormalisation), times
    `scale` (moe.routed_scale: applied to the A weights here, not to the [T, D] output)."""
    weights_A = probs_A * kept_A
    if renormalize:
        weights_KT = weights_A.view(top_k, -1)
        denom_T = weights_KT.sum(dim=0).clamp_min(torch.finfo(weights_A.dtype).eps)
        weights_A = (weights_KT / denom_T).reshape(-1)
    return weights_A * scale if scale != 1.0 else weights_A


@dataclass
class _Pairs:
    ids_A: torch.Tensor
    probs_A: torch.Tensor
    active_A: torch.Tensor
    group_A: torch.Tensor  # expert id, or E (a sentinel group sorted last) for pairs switched off by sampling
    token_A: torch.Tensor


def _flatten_pairs(ids_TK, probs_TK, active_TK, num_experts: int) -> _Pairs:
    num_tokens, top_k = ids_TK.shape
    ids_A = flatten_choices(ids_TK)
    if active_TK is None:
        active_A = torch.ones_like(ids_A, dtype=torch.bool)
    else:
        active_A = flatten_choices(active_TK)
    group_A = torch.where(active_A, ids_A, num_experts)
    token_A = torch.arange(num_tokens, device=ids_TK.device).repeat(top_k)
    return _Pairs(ids_A, flatten_choices(probs_TK), active_A, group_A, token_A)


def capacity_plan(ids_TK, probs_TK, active_TK, num_experts: int, capacity: int, drop_policy: str,
                  renormalize: bool, scale: float = 1.0) -> DispatchPlan:
    """Fixed-capacity plan: expert e owns rows [e * C, (e + 1) * C); pairs ranked >= C in their expert are dropped."""
    num_tokens, top_k = ids_TK.shape
    p = _flatten_pairs(ids_TK, probs_TK, active_TK, num_experts)
    order_A = priority_order(p.group_A, p.probs_A, drop_policy)
    slot_A, counts_G = rank_in_group(p.group_A, order_A, num_experts + 1)
    kept_A = p.active_A & (slot_A < capacity)
    num_rows = num_experts * capacity
    dest_A = torch.where(kept_A, p.ids_A * capacity + slot_A, 0)
    # Dropped pairs all write to one scratch row past the end, cut off below; kept destinations are unique.
    num_pairs = p.token_A.numel()
    pair_R = torch.full((num_rows + 1,), num_pairs, dtype=torch.long, device=ids_TK.device)
    pair_R.scatter_(0, torch.where(kept_A, dest_A, num_rows), torch.arange(num_pairs, device=ids_TK.device))
    pair_R = pair_R[:num_rows]
    src_R = F.pad(p.token_A, (0, 1), value=num_tokens)[pair_R]  # empty slot (pair A) -> the pad row T
    counts_E = counts_G[:num_experts].clamp_max(capacity)
    weights_A = combine_weights(p.probs_A, kept_A, top_k, renormalize, scale)
    return DispatchPlan(num_tokens, num_experts, top_k, capacity, src_R, pair_R, dest_A, weights_A, counts_E,
                        kept_A, p.active_A)


def dropless_plan(ids_TK, probs_TK, num_experts: int, renormalize: bool, scale: float = 1.0) -> DispatchPlan:
    """Dropless plan: every pair is computed; rows are the A pairs sorted by expert (token order inside a group)."""
    num_tokens, top_k = ids_TK.shape
    p = _flatten_pairs(ids_TK, probs_TK, None, num_experts)
    order_A = torch.argsort(p.ids_A, stable=True)
    dest_A = torch.empty_like(order_A)
    dest_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    counts_E = count_per_group(p.ids_A, num_experts)
    weights_A = combine_weights(p.probs_A, p.active_A, top_k, renormalize, scale)
    return DispatchPlan(num_tokens, num_experts, top_k, None, p.token_A[order_A], order_A, dest_A, weights_A,
                        counts_E, p.active_A, p.active_A)
