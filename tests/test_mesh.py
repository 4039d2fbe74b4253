"""The mesh's groups are the ones docs/PARALLELISM.md and ParallelContext's rank arithmetic describe."""

from __future__ import annotations

import pytest

from multiproc import run_ranks


def group_ranks(rank: int, world_size: int, dp: int, ep: int, tp: int) -> dict:
    import torch.distributed as dist

    from moe_train.parallel.context import ParallelContext
    from moe_train.config.parallel import ParallelDims
    from moe_train.parallel.mesh import build_mesh

    dims = ParallelDims(dp, ep, tp)
    groups = build_mesh(dims, "cpu")
    ctx = ParallelContext(rank, dims, groups)
    ranks = {name: sorted(dist.get_process_group_ranks(getattr(groups, name))) if getattr(groups, name) else [rank]
             for name in ("dp", "ep", "edp", "tp")}
    return {**ranks, "dp_rank": ctx.dp_rank, "ep_rank": ctx.ep_rank, "tp_rank": ctx.tp_rank}


def expected(rank: int, dp: int, ep: int, tp: int) -> dict:
    tp_i, ep_i, edp_i = rank % tp, (rank // tp) % ep, rank // (tp * ep)
    at = lambda e, p, t: (e * ep + p) * tp + t  # noqa: E731
    return {"tp": [at(edp_i, ep_i, t) for t in range(tp)], "ep": [at(edp_i, p, tp_i) for p in range(ep)],
            "edp": [at(e, ep_i, tp_i) for e in range(dp // ep)],
            "dp": sorted(at(e, p, tp_i) for e in range(dp // ep) for p in range(ep)),
            "dp_rank": edp_i * ep + ep_i, "ep_rank": ep_i, "tp_rank": tp_i}


@pytest.mark.parametrize("dp,ep,tp", [(4, 2, 1), (2, 2, 2)])
def test_mesh_groups_follow_the_documented_rank_order(dp, ep, tp):
    for rank, got in enumerate(run_ranks(dp * tp, group_ranks, dp, ep, tp)):
        assert got == expected(rank, dp, ep, tp), rank
