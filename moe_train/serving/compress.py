"""Fewer experts per MoE layer, by pruning or merging, from calibration statistics (moe_train.serving.calibrate).

Shape legend: E experts before, N experts after, D model width, F expert hidden width.

Each method turns a layer's ExpertStats into N groups; a group is one output expert = a weighted sum of source
experts (one member with weight 1 when pruning). The same weights combine the experts' w1 / w2 / w3 and the router's
rows, so the router keeps one logit per output expert (Mixtral layout with N experts).

- prune-frequency: keep the N experts most often routed to (top-k choices on the calibration tokens).
- prune-reap: keep the N largest REAP saliencies (router-weighted activation norm; CerebrasResearch/reap).
- merge-average / merge-frequency: MC-SMoE's grouping (arXiv 2310.01334): the N most used experts are the
  dominant ones; every other expert joins the dominant expert whose router logits are most similar (cosine over the
  calibration tokens); a group is merged by a plain average, or weighted by usage (MC-SMoE). MC-SMoE first aligns
  the hidden units of the members by a permutation; this does not (see docs/SERVING.md).
- with a task (moe-train-compress --task, task-routed models): the statistics count that task's tokens only, and
  prune-frequency keeps the experts the task routes to (Task-MoE's sub-network extraction, Kudugunta et al. 2021).
- merge-output-cluster: HC-SMoE (arXiv 2410.08589): average-linkage hierarchical clustering of the experts by the
  Euclidean distance of their mean outputs over all calibration tokens, down to N clusters; usage-weighted merge.

The router row of a merged group is the same weighted sum of its members' rows: one linear logit cannot carry the
members' summed probability (a log-sum-exp), and averaging keeps it in the members' span. Not exact; measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_train.serving.calibrate import ExpertStats

METHODS = ("prune-frequency", "prune-reap", "merge-average", "merge-frequency", "merge-output-cluster")
EXPERT_TENSORS = ("experts.w1", "experts.w2", "experts.w3", "router.weight", "router.noise_weight",
                  "router.expert_bias")  # the balancing bias: one entry per expert, combined like the router rows


@dataclass(frozen=True)
class Group:
    """One output expert: sum_i weights[i] * expert members[i] (weights sum to 1)."""

    members: tuple[int, ...]
    weights: tuple[float, ...]


def check_target(num_experts: int, top_k: int, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not top_k <= n <= num_experts:
        raise ValueError(f"--experts {n!r}: must be an integer with moe.top_k={top_k} <= N <= "
                         f"moe.num_experts={num_experts} (a token needs top_k distinct experts)")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: expected one of {', '.join(METHODS)}")


def top_n(score_E: torch.Tensor, n: int) -> list[int]:
    """The n highest scores, ties to the lower id, returned in id order (so that kept experts keep their order)."""
    order = sorted(range(score_E.numel()), key=lambda e: (-float(score_E[e]), e))
    return sorted(order[:n])


def prune_groups(score_E: torch.Tensor, n: int) -> list[Group]:
    return [Group((e,), (1.0,)) for e in top_n(score_E, n)]


def usage_weights(members: list[int], counts_E: torch.Tensor) -> tuple[float, ...]:
    """Weights proportional to usage; uniform when no member was used on the calibration data."""
    used = [float(counts_E[e]) for e in members]
    total = sum(used)
    return tuple(u / total for u in used) if total > 0 else tuple(1.0 / len(members) for _ in members)


def weighted(clusters: list[list[int]], counts_E: torch.Tensor, by_usage: bool) -> list[Group]:
    return [Group(tuple(c), usage_weights(c, counts_E) if by_usage else tuple(1.0 / len(c) for _ in c))
            for c in clusters]


def dominant_clusters(stats: ExpertStats, n: int) -> list[list[int]]:
    """MC-SMoE: the n most used experts lead; the others join their most router-similar leader."""
    leaders = top_n(stats.counts_E, n)
    similarity_EE = stats.logit_similarity()
    clusters = {lead: [lead] for lead in leaders}
    for e in range(stats.counts_E.numel()):
        if e not in clusters:
            best = max(leaders, key=lambda lead: (float(similarity_EE[e, lead]), -lead))
            clusters[best].append(e)
    return [sorted(clusters[lead]) for lead in leaders]


def average_linkage(distance_EE: torch.Tensor, n: int) -> list[list[int]]:
    """Agglomerative clustering down to n clusters; the distance of two clusters = mean pairwise distance.
    O(E^3): fine for the tens to hundreds of experts of a layer."""
    clusters = [[e] for e in range(distance_EE.shape[0])]
    while len(clusters) > n:
        pairs = ((i, j) for i in range(len(clusters)) for j in range(i + 1, len(clusters)))
        i, j = min(pairs, key=lambda p: float(distance_EE[clusters[p[0]]][:, clusters[p[1]]].mean()))
        clusters[i] = sorted(clusters[i] + clusters.pop(j))
    return clusters


def layer_groups(method: str, stats: ExpertStats, n: int) -> list[Group]:
    """The N output experts of one layer under `method`."""
    check_method(method)
    if method == "prune-frequency":
        return prune_groups(stats.counts_E, n)
    if method == "prune-reap":
        return prune_groups(stats.reap_E, n)
    if method in ("merge-average", "merge-frequency"):
        return weighted(dominant_clusters(stats, n), stats.counts_E, by_usage=method == "merge-frequency")
    mean_out_ED = stats.mean_out_ED
    return weighted(average_linkage(torch.cdist(mean_out_ED, mean_out_ED), n), stats.counts_E, by_usage=True)


def used_experts(counts_E: torch.Tensor, min_usage: float) -> int:
    """Experts receiving at least `min_usage` of the layer's routed pairs."""
    total = float(counts_E.sum())
    return int((counts_E >= min_usage * total).sum()) if total > 0 else 0


def task_width(stats: dict[str, ExpertStats], top_k: int, min_usage: float) -> int:
    """N of a task's sub-network: the most experts any layer routes the task to (usage >= min_usage), at least
    top_k. One N for all layers: a weights file (and Mixtral) has the same number of experts in every layer, so a
    layer that uses fewer keeps its next most used ones."""
    return max(top_k, *(used_experts(s.counts_E, min_usage) for s in stats.values()))


def combine(w_E: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """[E, ...] -> [N, ...]: each output row the weighted sum of its members' rows (in float64, then w_E's dtype)."""
    rows = [sum(w * w_E[m].double() for m, w in zip(g.members, g.weights)) for g in groups]
    return torch.stack(rows).to(w_E.dtype)


def compress_state(state: dict[str, torch.Tensor], groups: dict[str, list[Group]]) -> dict[str, torch.Tensor]:
    """A copy of `state` with every MoE layer's experts and router rows combined by that layer's groups."""
    out = dict(state)
    for layer, layer_groups_ in groups.items():
        for suffix in EXPERT_TENSORS:
            key = f"{layer}.{suffix}"
            if key in state:
                out[key] = combine(state[key], layer_groups_)
    return out
