"""Sharded construction (models/init.py, parallel/sharding.py): a rank builds its part of the model on the meta
device, allocates only that and initialises it to exactly the slices of the unsharded initialisation.

The layouts are built without a process group: cutting shapes and initialising need only the rank's position in
the mesh (the groups are used by the dispatchers and hooks at run time, not here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import load_bench_script
from moe_train.config import Config, ModelConfig, MoEConfig
from moe_train.config.parallel import ParallelConfig, ParallelDims
from moe_train.models.init import param_seed
from moe_train.models.transformer import build_model
from moe_train.parallel.context import ParallelContext
from moe_train.parallel.expert_parallel import CommCounter
from moe_train.parallel.parallelize import parallelize

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, moe_every=2,
                    max_seq_len=16)
MOE = MoEConfig(num_experts=4, top_k=2, d_ff=24, num_shared_experts=1, router="noisy_topk")
SEED = 1234


def build_rank(rank: int, dims: ParallelDims, expert_tp: bool = True, seed: int = SEED):
    ctx = ParallelContext(rank, dims, None)
    cfg = Config(parallel=ParallelConfig(dp=dims.dp, ep=dims.ep, tp=dims.tp, expert_tp=expert_tp))
    return build_model(MODEL, MOE, seed=seed, shard=lambda m: parallelize(m, ctx, cfg, CommCounter()))


LAYOUTS = {"ep2": ParallelDims(2, 2, 1), "tp2": ParallelDims(1, 1, 2), "ep2_tp2": ParallelDims(2, 2, 2),
           "dp4_ep2": ParallelDims(4, 2, 1)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_rank_holds_exactly_the_slices_of_the_unsharded_init(layout):
    dims = LAYOUTS[layout]
    whole = dict(build_model(MODEL, MOE, seed=SEED).named_parameters())
    split_somewhere = set()
    for rank in range(dims.world_size):
        model = build_rank(rank, dims)
        for name, p in model.named_parameters():
            spec = model.shard_specs[name]
            assert tuple(p.shape) == spec.shape
            assert torch.equal(p, whole[name][spec.local_slices()]), (layout, rank, name)
            if not spec.is_whole:
                split_somewhere.add(name)
    expected = {"ep": "moe.experts.w1", "tp": "attention.wq.weight"}
    for mesh_dim, fragment in expected.items():
        if getattr(dims, mesh_dim) > 1:
            assert any(fragment in name for name in split_somewhere), (layout, mesh_dim)


def test_specs_record_the_split_dims_and_the_global_expert_ids():
    model = build_rank(3, LAYOUTS["ep2_tp2"])  # tp rank 1, ep rank 1
    w1 = model.shard_specs["layers.1.moe.experts.w1"]
    assert (w1.global_shape, w1.shape, w1.offsets, w1.over) == ((4, 24, 32), (2, 12, 32), (2, 12, 0), ("tp", "ep"))
    assert w1.expert and w1.tp_dim == 1
    wo = model.shard_specs["layers.0.attention.wo.weight"]
    assert (wo.shape, wo.offsets, wo.over, wo.expert) == ((32, 16), (0, 16), ("tp",), False)
    router = model.shard_specs["layers.1.moe.router.weight"]
    assert router.is_whole and router.over == () and not router.expert


def test_init_follows_the_seed_and_not_the_global_generator():
    torch.manual_seed(0)
    a = build_model(MODEL, MOE, seed=SEED)
    torch.manual_seed(1)
    b = build_model(MODEL, MOE, seed=SEED)
    c = build_model(MODEL, MOE, seed=SEED + 1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" not in name and "noise_weight" not in name:
            assert not torch.equal(pa, pc), name
    torch.manual_seed(5)  # seed None: drawn from the global generator, so seeded programs stay reproducible
    d = build_model(MODEL, MOE)
    torch.manual_seed(5)
    assert all(torch.equal(p, q) for p, q in zip(d.parameters(), build_model(MODEL, MOE).parameters()))


def test_init_distributions():
    model = build_model(dataclasses.replace(MODEL, d_model=64, d_ff=512), MOE, seed=SEED)
    assert torch.equal(model.layers[0].attention_norm.weight, torch.ones(64))
    assert torch.equal(model.layers[1].moe.router.noise_weight, torch.zeros(4, 64))
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - MODEL.init_std) < 0.1 * MODEL.init_std and abs(w.mean().item()) < 1e-3
    experts = model.layers[1].moe.experts.w1
    assert not torch.equal(experts[0], experts[1])  # one generator per expert


def test_param_seed_is_stable():
    """Seeds must not change between processes or releases: a resumed or resharded run relies on them."""
    assert param_seed(0, "tok_embeddings.weight") == param_seed(0, "tok_embeddings.weight")
    assert len({param_seed(0, "a"), param_seed(1, "a"), param_seed(0, "b"), param_seed(0, "a", 0)}) == 4
    assert 0 <= param_seed(2**40, "x", 7) < 2**63


def test_a_width_that_does_not_divide_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"dim 0 of size 4 into 3 equal parts over ep"):
        build_rank(0, ParallelDims(3, 3, 1))


def test_building_a_rank_at_ep4_peaks_at_about_its_shard():
    """bench/build_memory.py: a ~420 MB float32 MoE, rank 1 of ep 4, each build in a fresh process."""
    bench = load_bench_script("build_memory")
    sharded, full = bench.measure("sharded"), bench.measure("full")
    assert full["held"] > 400e6 and sharded["held"] < 0.3 * full["held"]
    # The shard plus allocator slack; the whole model never materialises.
    assert sharded["peak"] < 1.15 * sharded["held"] + 16e6, sharded
    assert full["peak"] > 0.9 * full["held"], full  # the measure sees a whole model
