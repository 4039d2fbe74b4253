"""Expert pruning and merging (moe_train.serving, `moe-train-compress`): the statistics against a per-token loop, the
groupings on constructed cases (identical experts cluster together, leaders are the most used), merges as weighted
sums, the identity at N = E, and the CLI's output read by moe-train-eval, init.from and moe-train-convert to-hf."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

from moe_train.compress import main
from moe_train.config.moe import MoEConfig
from moe_train.evaluate import main as eval_main
from moe_train.interop.hf import load_mixtral, load_weights
from moe_train.interop.cli import main as convert_main
from moe_train.models.moe.activations import expert_mlp
from moe_train.models.moe.layer import MoELayer
from moe_train.models.transformer import build_model
from moe_train.serving import compress
from moe_train.serving.calibrate import ExpertStats, accumulate
from test_distributed_train import make_trainer, overrides
from test_evaluate import train_and_save

TRAIN = ("train.max_steps=6", "train.eval_every=0", "train.eval_batches=3", "moe.num_experts=6")


def layer(num_experts=6, top_k=2, renormalize=True, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(16, MoEConfig(num_experts=num_experts, top_k=top_k, d_ff=8, capacity_factor=-1,
                                  renormalize=renormalize)).eval()


# -- statistics -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("renormalize", [True, False])
def test_statistics_equal_a_per_token_loop(renormalize):
    moe, x_TD = layer(renormalize=renormalize), torch.randn(40, 16)
    stats = ExpertStats.zeros(6, 16)
    accumulate(stats, moe, x_TD[:25])
    accumulate(stats, moe, x_TD[25:])  # two batches add up
    probs_TE = torch.softmax(x_TD @ moe.router.weight.t(), -1)
    counts, reap, outs = torch.zeros(6), torch.zeros(6), torch.zeros(6, 16)
    for t in range(40):
        p, ids = probs_TE[t].topk(2)
        gates = p / p.sum() if renormalize else p
        for e in range(6):
            w = moe.experts
            f = expert_mlp(x_TD[t:t + 1], w.w1[e], w.w2[e], w.w3[e], "swiglu")[0]
            outs[e] += f
            if e in ids.tolist():
                counts[e] += 1
                reap[e] += gates[ids.tolist().index(e)] * f.norm()
    assert stats.tokens == 40 and torch.equal(stats.counts_E, counts.double())
    torch.testing.assert_close(stats.reap_E.float(), reap / counts.clamp_min(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mean_out_ED.float(), outs / 40, rtol=1e-5, atol=1e-6)
    logits = (x_TD @ moe.router.weight.t()).double()
    cosine = torch.nn.functional.cosine_similarity(logits.t()[:, None], logits.t()[None], dim=-1)
    torch.testing.assert_close(stats.logit_similarity(), cosine)


# -- groupings ------------------------------------------------------------------------------------------------------
def stats_with(counts, mean_out=None, gram=None) -> ExpertStats:
    e = len(counts)
    stats = ExpertStats.zeros(e, 2)
    stats.counts_E = torch.tensor(counts, dtype=torch.float64)
    stats.reap_sum_E = stats.counts_E.clone()
    if mean_out is not None:
        stats.out_sum_ED, stats.tokens = torch.tensor(mean_out, dtype=torch.float64), 1
    if gram is not None:
        stats.logit_gram_EE = torch.tensor(gram, dtype=torch.float64)
    return stats


def test_prune_keeps_the_top_scores_in_id_order_ties_to_the_lower_id():
    assert compress.top_n(torch.tensor([3.0, 9.0, 1.0, 9.0, 5.0]), 3) == [1, 3, 4]
    assert compress.top_n(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]
    groups = compress.layer_groups("prune-frequency", stats_with([5, 0, 7, 2]), 2)
    assert groups == [compress.Group((0,), (1.0,)), compress.Group((2,), (1.0,))]


def test_output_clustering_groups_identical_experts():
    # experts 0/3, 1/4 and 2/5 have the same mean output: 3 clusters are exactly these pairs
    points = [[0.0, 0.0], [5.0, 0.0], [0.0, 7.0]]
    stats = stats_with([1, 2, 3, 3, 2, 1], mean_out=points + points)
    groups = compress.layer_groups("merge-output-cluster", stats, 3)
    assert [g.members for g in groups] == [(0, 3), (1, 4), (2, 5)]
    assert [g.weights for g in groups] == [(0.25, 0.75), (0.5, 0.5), (0.75, 0.25)]  # by usage


def test_average_linkage_uses_the_mean_distance():
    # 0,1 at distance 1; 2 is 2.9 from 0 but 3.2 from 1: average linkage joins {0,1} and 2 last
    d = torch.tensor([[0, 1, 2.9, 10], [1, 0, 3.2, 10], [2.9, 3.2, 0, 10], [10, 10, 10, 0.0]])
    assert compress.average_linkage(d, 3) == [[0, 1], [2], [3]]
    assert compress.average_linkage(d, 2) == [[0, 1, 2], [3]]


def test_dominant_grouping_joins_the_most_router_similar_leader():
    # leaders = the two most used (0 and 2); expert 1's logits point like 2's, expert 3's like 0's
    gram = [[1, 0, 0, 0.9], [0, 1, 0.8, 0], [0, 0.8, 1, 0], [0.9, 0, 0, 1]]
    stats = stats_with([10, 1, 8, 3], gram=gram)
    average = compress.layer_groups("merge-average", stats, 2)
    assert [g.members for g in average] == [(0, 3), (1, 2)] and average[0].weights == (0.5, 0.5)
    frequency = compress.layer_groups("merge-frequency", stats, 2)
    assert frequency[0].weights == pytest.approx((10 / 13, 3 / 13)) and frequency[1].weights == (1 / 9, 8 / 9)


def test_unused_members_merge_uniformly():
    assert compress.usage_weights([1, 2], torch.tensor([4.0, 0.0, 0.0])) == (0.5, 0.5)


def test_combine_is_the_weighted_sum_of_members():
    w_E = torch.randn(4, 3, 2)
    groups = [compress.Group((1,), (1.0,)), compress.Group((0, 2, 3), (0.5, 0.25, 0.25))]
    out = compress.combine(w_E, groups)
    assert torch.equal(out[0], w_E[1])
    torch.testing.assert_close(out[1], 0.5 * w_E[0] + 0.25 * w_E[2] + 0.25 * w_E[3])


@pytest.mark.parametrize("n, top_k", [(1, 2), (7, 2), (0, 1)])
def test_bad_targets_are_refused(n, top_k):
    with pytest.raises(ValueError, match=f"--experts {n}.*top_k={top_k} <= N <= moe.num_experts=6"):
        compress.check_target(6, top_k, n)


# -- the command ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
    run_dir = tmp_path_factory.mktemp("run")
    train_and_save(0, 1, overrides("dropless", 1, TRAIN), str(run_dir))
    return run_dir / "weights.safetensors"


def run_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def val_loss(capsys, path) -> float:
    eval_main([str(path), "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["val_loss"]


def test_all_experts_kept_is_the_identity(trained, tmp_path, capsys):
    out = tmp_path / "same.safetensors"
    summary = run_json(capsys, str(trained), str(out), "--experts", "6", "--method", "merge-output-cluster")
    assert summary["params_after"] == summary["params_before"]
    source, result = load_weights(trained).state_dict(), load_weights(out).state_dict()
    assert all(torch.equal(source[k], result[k]) for k in source)
    assert val_loss(capsys, out) == val_loss(capsys, trained)


@pytest.mark.parametrize("method", compress.METHODS)
def test_every_method_writes_a_weights_file_the_tools_accept(trained, tmp_path, capsys, method):
    out = tmp_path / f"{method}.safetensors"
    summary = run_json(capsys, str(trained), str(out), "--experts", "3", "--method", method,
                       "--calibration-batches", "2")
    model = load_weights(out)
    assert model.moe_cfg.num_experts == 3 and model.layers[0].moe.router.weight.shape == (3, 32)
    members = sorted(sum(summary["groups"]["layers.0.moe"], []))
    if method.startswith("merge"):
        assert members == list(range(6))  # every expert lands in one group
    else:
        assert all(len(g) == 1 for g in summary["groups"]["layers.0.moe"]) and len(set(members)) == 3
    assert summary["params_after"] == sum(t.numel() for t in model.state_dict().values()) < summary["params_before"]
    assert 0.0 < val_loss(capsys, out) < 6.0  # the source's validation batches, a working model (ln 256 = 5.5)
    if method == "prune-reap":  # the HF export and a healing fine-tune from it
        convert_main(["to-hf", str(out), str(tmp_path / "hf")])
        hf = load_mixtral(tmp_path / "hf")
        tokens = torch.randint(0, 256, (2, 16))
        torch.testing.assert_close(hf(tokens), model(tokens))  # routed_scale is folded into w2 by the export
        heal = make_trainer(overrides("dropless", 1, (*TRAIN, "moe.num_experts=3", f"init.from={out}")), 1, 0,
                            tmp_path / "heal")
        assert torch.equal(heal.model.layers[1].moe.experts.w2.detach(), model.layers[1].moe.experts.w2)


@pytest.mark.parametrize("argv, message", [
    (["--experts", "1", "--method", "prune-reap"], "--experts 1: must be an integer with moe.top_k=2"),
    (["--experts", "7", "--method", "prune-reap"], "N <= moe.num_experts=6"),
    (["--experts", "3", "--method", "prune-reap", "--calibration-batches", "0"], "--calibration-batches 0"),
    (["--experts", "3"], "--experts N and --method M are required (without --task)"),
    (["--task", "json"], "--task 'json': the data carries no task ids"),
])
def test_bad_requests_exit_with_a_message(trained, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([str(trained), str(tmp_path / "out.safetensors"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_is_never_overwritten(trained, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    out.write_text("precious")
    with pytest.raises(SystemExit):
        main([str(trained), str(out), "--experts", "3", "--method", "prune-reap"])
    assert "already exists" in capsys.readouterr().err and out.read_text() == "precious"


def test_a_dense_source_is_refused(tmp_path, capsys):
    train_and_save(0, 1, overrides("dropless", 1, ("train.max_steps=1", "model.moe_every=0")), str(tmp_path))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "weights.safetensors"), str(tmp_path / "o.safetensors"), "--experts", "2",
              "--method", "prune-reap"])
    assert "is a dense model" in capsys.readouterr().err


def test_pruning_equals_masking_the_removed_experts_logits(trained):
    """Renormalised top-k over the kept experts: the pruned model computes exactly the source model with the removed
    experts' router logits at -inf (the softmax normaliser cancels in the renormalisation)."""
    model = load_weights(trained)
    groups = {f"layers.{i}.moe": compress.prune_groups(torch.tensor([5.0, 1, 4, 0, 3, 2]).roll(i), 4)
              for i in range(len(model.layers))}
    small = build_model(model.cfg, dataclasses.replace(model.moe_cfg, num_experts=4)).eval()
    small.load_state_dict(compress.compress_state(model.state_dict(), groups))
    for i, layer in enumerate(model.layers):
        kept = sum((list(g.members) for g in groups[f"layers.{i}.moe"]), [])
        mask_E = torch.full((6,), float("-inf"))
        mask_E[kept] = 0.0
        router = layer.moe.router
        router.compute_logits = (lambda original, mask: lambda x: original(x) + mask)(router.compute_logits, mask_E)
    tokens = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(small(tokens), model(tokens))


def test_a_balancing_bias_is_pruned_with_its_experts():
    """The aux-loss-free bias has one entry per expert: pruning keeps the kept experts' entries, in order."""
    groups = compress.prune_groups(torch.tensor([5.0, 1, 4, 0, 3, 2]), 3)  # keeps experts 0, 2, 4
    state = {"layers.0.moe.router.expert_bias": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}
    out = compress.compress_state(state, {"layers.0.moe": groups})
    torch.testing.assert_close(out["layers.0.moe.router.expert_bias"], torch.tensor([0.1, 0.3, 0.5]))
