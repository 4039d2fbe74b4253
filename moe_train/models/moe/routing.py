"""From router decisions to a dispatch plan: which token fills which expert-input row, which expert-output row each
token-expert pair reads back, and with what weight. Two kinds: a token-choice plan (each token chose K experts;
capacity or dropless) and an expert-choice plan (each expert chose C tokens). Index-based: no [T, E, C] one-hot tensor is ever built
(the GShard/fairseq einsum formulation costs O(k * cf * T^2) memory); every step here is O(T * K log(T * K)).

Shape legend:
  T tokens, D model width, E experts, K experts per token, C capacity (slots per expert),
  A = K * T token-expert pairs ("assignments"), flattened choice-major: a = k * T + t, so all first choices come
    before all second choices, as in GShard and DeepSpeed,
  R rows of expert input: E * C in capacity mode (and expert choice), A in dropless mode.

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

from moe_train.models.moe.gather import gather_rows


@dataclass
class DispatchPlan:
    """Where each expert-input row comes from and how expert outputs return to their tokens. A router builds the
    plan that fits its decisions (router.py); dispatchers use only the fields and the two methods below."""

    num_tokens: int  # T
    num_experts: int  # E
    capacity: Optional[int]  # C: rows are an [E, C] buffer; None: dropless, rows grouped by expert (counts_E)
    src_R: torch.Tensor  # int64: token feeding each expert-input row (T: the zero pad row of an empty slot)
    counts_E: torch.Tensor  # int64 rows computed per expert

    def gather(self, x_TD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        """x_RD: the expert-input rows (empty slots zero)."""
        raise NotImplementedError

    def combine(self, y_RD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        """Float32 (or wider) y_TD: each token's gate-weighted sum of its rows' outputs."""
        raise NotImplementedError

    def drop_fraction(self) -> torch.Tensor:
        """Share of the routing left uncomputed (statistics)."""
        raise NotImplementedError


@dataclass
class TokenChoicePlan(DispatchPlan):
    """Each token chose K experts: pairs a = k * T + t, choice-major. Combine sums K rows per token, so both gathers
    (and their backward) are scatter-free."""

    top_k: int  # K
    pair_R: torch.Tensor  # int64: pair feeding each row; A for an empty slot (the inverse map)
    dest_A: torch.Tensor  # int64: expert-output row each pair reads back (0 where dropped: its weight is 0)
    weights_A: torch.Tensor  # float32 combine weight per pair, 0 where dropped; differentiable (router gradient)
    kept_A: torch.Tensor  # bool: pair computed
    active_A: torch.Tensor  # bool: pair chosen by the router (second-expert sampling may switch one off)

    def gather(self, x_TD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        # One gather from x (plus a zero pad row for empty capacity slots); its backward gathers each token's K
        # rows (a dropped pair reads the zero row R).
        capacity = self.capacity is not None
        rows_A = torch.where(self.kept_A, self.dest_A, self.src_R.numel()) if capacity else self.dest_A
        return gather_rows(x_TD, self.src_R, rows_A.view(self.top_k, -1), pad_x=capacity, pad_grad=capacity,
                           scatter_free=scatter_free)

    def combine(self, y_RD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        # Weighted sum over each token's K pairs in the weights' dtype (float32): a 16-bit y is promoted by the
        # multiply, so the K-term sum and the router weights' gradient are not rounded to 16 bits. Cost: a
        # [K, T, D] float32 product (the H100 profile in docs/GPU.md); a 16-bit product would halve that traffic.
        # Scatter-free backward: each row's gradient is its pair's (an empty slot's, pair A, is the zero row).
        d_model = y_RD.shape[-1]
        y_AD = gather_rows(y_RD, self.dest_A, self.pair_R.view(1, -1), pad_grad=self.capacity is not None,
                           scatter_free=scatter_free)
        weights_KT1 = self.weights_A.view(self.top_k, self.num_tokens, 1)
        return (y_AD.view(self.top_k, self.num_tokens, d_model) * weights_KT1).sum(dim=0)

    def drop_fraction(self) -> torch.Tensor:
        """Share of the routed pairs dropped by capacity."""
        return 1.0 - self.kept_A.sum() / self.active_A.sum().clamp_min(1)


@dataclass
class ExpertChoicePlan(DispatchPlan):
    """Each expert chose C tokens: row r = e * C + c is expert e's c-th pick; a token has 0..E rows. The gather's
    backward and the combine add rows into tokens (index_add: atomics on CUDA, unlike the token-choice plan)."""

    weights_R: torch.Tensor  # float32 gate of each row, differentiable (router gradient)

    def gather(self, x_TD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        return x_TD.index_select(0, self.src_R)

    def combine(self, y_RD: torch.Tensor, scatter_free: bool) -> torch.Tensor:
        weighted_RD = y_RD * self.weights_R.unsqueeze(-1)  # float32 (the weights' dtype)
        out_TD = weighted_RD.new_zeros(self.num_tokens, y_RD.shape[-1])
        return out_TD.index_add(0, self.src_R, weighted_RD)

    def drop_fraction(self) -> torch.Tensor:
        """Share of the tokens no expert chose (they pass through the residual only)."""
        picked_T = count_per_group(self.src_R, self.num_tokens)
        return (picked_T == 0).float().mean()


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
                  renormalize: bool, scale: float = 1.0) -> TokenChoicePlan:
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
    return TokenChoicePlan(num_tokens, num_experts, capacity, src_R, counts_E, top_k, pair_R, dest_A, weights_A,
                           kept_A, p.active_A)


def dropless_plan(ids_TK, probs_TK, num_experts: int, renormalize: bool, scale: float = 1.0) -> TokenChoicePlan:
    """Dropless plan: every pair is computed; rows are the A pairs sorted by expert (token order inside a group)."""
    num_tokens, top_k = ids_TK.shape
    p = _flatten_pairs(ids_TK, probs_TK, None, num_experts)
    order_A = torch.argsort(p.ids_A, stable=True)
    dest_A = torch.empty_like(order_A)
    dest_A[order_A] = torch.arange(order_A.numel(), device=order_A.device)
    counts_E = count_per_group(p.ids_A, num_experts)
    weights_A = combine_weights(p.probs_A, p.active_A, top_k, renormalize, scale)
    return TokenChoicePlan(num_tokens, num_experts, None, p.token_A[order_A], counts_E, top_k, order_A, dest_A,
                           weights_A, p.active_A, p.active_A)


def expert_choice_plan(scores_TE: torch.Tensor, capacity: int, scale: float = 1.0) -> ExpertChoicePlan:
    """Expert choice (Zhou et al. 2022): expert e takes the min(C, T) tokens with the highest scores_TE[:, e]; the
    gate of each pick is its score (times moe.routed_scale). Every expert is full, so nothing is dropped."""
    num_tokens, num_experts = scores_TE.shape
    picks = min(capacity, num_tokens)
    gates_EC, src_EC = torch.topk(scores_TE.t(), picks, dim=1)
    counts_E = torch.full((num_experts,), picks, dtype=torch.long, device=scores_TE.device)
    weights_R = gates_EC.reshape(-1) * scale if scale != 1.0 else gates_EC.reshape(-1)
    return ExpertChoicePlan(num_tokens, num_experts, picks, src_EC.reshape(-1), counts_E, weights_R)
