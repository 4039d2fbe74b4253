"""Routers beyond softmax token choice (issue 16): expert choice against a mask-based reference, sigmoid scores,
the aux-loss-free selection bias and its update over two steps at ep2 against the formula, the sequence and
global-batch balancing losses against their definitions, and the configs Mixtral export refuses."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from helpers import make_layer
from moe_train.config import MoEConfig, ModelConfig
from moe_train.models.moe import losses
from moe_train.models.moe.activations import expert_mlp
from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides

T, D, E = 24, 16, 4


def expert_out(layer, e: int, x_ND: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return expert_mlp(x_ND, ex.w1[e], ex.w2[e], None if ex.w3 is None else ex.w3[e], ex.activation)


def mask_reference(layer, x_TD: torch.Tensor, gates_TE: torch.Tensor, mask_TE: torch.Tensor) -> torch.Tensor:
    """sum_e mask[t, e] * gate[t, e] * expert_e(x_t): every expert on every token, kept by a dense mask."""
    outs_ETD = torch.stack([expert_out(layer, e, x_TD) for e in range(layer.cfg.num_experts)])
    return (outs_ETD * (mask_TE * gates_TE).t().unsqueeze(-1)).sum(0)


def grads_of(layer, x_TD, out_TD, upstream_TD) -> dict:
    layer.zero_grad(set_to_none=True)
    (out_TD * upstream_TD).sum().backward()
    return {"x": x_TD.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}


def layer_and_inputs(**cfg):
    torch.manual_seed(0)
    layer = make_layer(d_model=D, num_experts=E, **{"aux_loss_coef": 0.0, **cfg})
    return layer, torch.randn(T, D), torch.randn(T, D)


def compare_with_reference(layer, x, g, reference) -> None:
    """The layer's output and every gradient equal those of `reference(layer, x)` (a differentiable function)."""
    xa = x.clone().requires_grad_(True)
    out, _ = layer(xa)
    got = grads_of(layer, xa, out, g)
    xb = x.clone().requires_grad_(True)
    ref = reference(layer, xb)
    want = grads_of(layer, xb, ref, g)
    torch.testing.assert_close(out, ref)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


# -- expert choice ------------------------------------------------------------------------------------------------

def expert_choice_reference(layer, x_TD):
    probs_TE = torch.softmax(x_TD @ layer.router.weight.t(), -1)
    capacity = T * layer.cfg.top_k * layer.cfg.capacity_factor / E
    picks = int(capacity) if capacity == int(capacity) else int(capacity) + 1
    mask_TE = torch.zeros(T, E)
    for e in range(E):  # each expert's top-C tokens by its column of the token-wise softmax
        mask_TE[probs_TE[:, e].argsort(descending=True)[:picks], e] = 1.0
    return mask_reference(layer, x_TD, probs_TE, mask_TE)


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_expert_choice_equals_the_mask_reference_with_gradients(cf):
    layer, x, g = layer_and_inputs(router="expert_choice", capacity_factor=cf)
    compare_with_reference(layer, x, g, expert_choice_reference)
    stats = layer.last_stats  # every expert full; the drop fraction counts tokens no expert took
    assert stats.tokens_per_expert.tolist() == [stats.capacity] * E
    picked = torch.zeros(T)
    picked.index_add_(0, layer.router(x).plan.src_R, torch.ones(E * stats.capacity))
    assert stats.drop_frac.item() == pytest.approx((picked == 0).float().mean().item())


def test_expert_choice_routes_by_causal_token_choice_in_eval_mode():
    layer, x, _ = layer_and_inputs(router="expert_choice", capacity_factor=1.0, eval_capacity_factor=-1.0)
    twin = make_layer(d_model=D, num_experts=E, aux_loss_coef=0.0, capacity_factor=1.0, eval_capacity_factor=-1.0)
    twin.load_state_dict(layer.state_dict())
    layer.eval(), twin.eval()
    torch.testing.assert_close(layer(x)[0], twin(x)[0])
    # causal: a token's eval output does not depend on the tokens after it
    torch.testing.assert_close(layer(x[:10])[0], layer(x)[0][:10])


@pytest.mark.parametrize("bad, message", [
    (dict(capacity_factor=-1.0), "needs a positive moe.capacity_factor, got -1.0"),
    (dict(bias_update_rate=1e-3), "moe.bias_update_rate=0.001 \\(use 0\\)"),
    (dict(second_expert_policy="sampling"), "moe.second_expert_policy='sampling' \\(use 'all'\\)"),
])
def test_expert_choice_refuses_what_it_cannot_do(bad, message):
    with pytest.raises(ValueError, match=message):
        make_layer(router="expert_choice", **bad)


# -- sigmoid scores and the selection bias --------------------------------------------------------------------------

def sigmoid_topk_reference(layer, x_TD):
    scores_TE = torch.sigmoid(x_TD @ layer.router.weight.t())
    bias_E = layer.router.expert_bias if layer.router.expert_bias is not None else torch.zeros(E)
    ids_TK = (scores_TE.detach() + bias_E).topk(layer.cfg.top_k, dim=-1).indices  # the bias selects ...
    mask_TE = torch.zeros(T, E).scatter_(1, ids_TK, 1.0)
    gates_TE = scores_TE / (scores_TE * mask_TE).sum(-1, keepdim=True)  # ... the unbiased scores gate
    return mask_reference(layer, x_TD, gates_TE, mask_TE)


@pytest.mark.parametrize("bias", [None, [0.0, 0.0, 0.0, 5.0], [0.3, -0.1, 0.0, -0.2]])
def test_sigmoid_top2_with_selection_bias_equals_the_reference(bias):
    layer, x, g = layer_and_inputs(score_func="sigmoid", capacity_factor=-1.0,
                                   bias_update_rate=0.0 if bias is None else 1e-3)
    if bias is not None:
        layer.router.expert_bias.copy_(torch.tensor(bias))
    compare_with_reference(layer, x, g, sigmoid_topk_reference)
    if bias == [0.0, 0.0, 0.0, 5.0]:  # expert 3 is everyone's choice, whatever its score
        assert layer.last_stats.choices_E[3].item() == T
    assert "router.expert_bias" in layer.state_dict() if bias is not None else True


def test_sigmoid_losses_use_the_scores_normalised_over_all_experts():
    layer, x, _ = layer_and_inputs(score_func="sigmoid", capacity_factor=-1.0, aux_loss_counting="all")
    route = layer.router(x)
    scores = torch.sigmoid(x @ layer.router.weight.t())
    torch.testing.assert_close(route.probs_TE, scores / scores.sum(-1, keepdim=True))
    ids = scores.topk(2, dim=-1).indices
    f_E = torch.bincount(ids.flatten(), minlength=E) / T
    torch.testing.assert_close(layer.router_losses(route)[1], E * (f_E * route.probs_TE.mean(0)).sum())


def test_the_bias_update_follows_the_formula():
    from moe_train.training.expert_bias import bias_update

    loads = torch.tensor([[10.0, 2.0, 6.0, 6.0], [1.0, 1.0, 1.0, 1.0]])
    assert bias_update(loads, 0.5).tolist() == [[-0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("cfg", [dict(router="expert_choice", capacity_factor=1.0),
                                 dict(score_func="sigmoid", bias_update_rate=1e-3, capacity_factor=1.0)],
                         ids=["expert_choice", "sigmoid_bias"])
def test_new_routers_under_bf16_autocast_run_bf16_experts_and_keep_float32_routing(cfg):
    layer, x, g = layer_and_inputs(**cfg)
    grams = []
    layer.experts.register_forward_pre_hook(lambda module, args: grams.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = layer(x)
        route = layer.router(x)
    ((out * g).sum() + aux).backward()
    assert grams == [torch.bfloat16] and out.dtype == torch.float32  # experts in bf16, the residual's dtype back
    assert route.probs_TE.dtype == torch.float32 and layer.router.weight.grad.dtype == torch.float32
    assert layer.experts.w1.grad.dtype == torch.float32


# -- balancing-loss scopes ------------------------------------------------------------------------------------------

def test_sequence_scope_is_the_mean_of_per_sequence_losses():
    layer, _, _ = layer_and_inputs(capacity_factor=-1.0, aux_loss_scope="sequence", aux_loss_coef=1.0)
    x_BSD = torch.randn(3, 8, D)
    layer(x_BSD)
    per_sequence = []
    flat = make_layer(d_model=D, num_experts=E, capacity_factor=-1.0, aux_loss_coef=1.0)
    flat.load_state_dict(layer.state_dict())
    for b in range(3):
        flat(x_BSD[b])
        per_sequence.append(flat.last_stats.aux_loss)
    torch.testing.assert_close(layer.last_stats.aux_loss, torch.stack(per_sequence).mean())
    flat(x_BSD)  # and it differs from the micro-batch loss over all 24 tokens
    assert not torch.allclose(layer.last_stats.aux_loss, flat.last_stats.aux_loss)


def global_scope_rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from moe_train.parallel.expert_parallel import apply_batch_scope

    layer, x_all, _ = layer_and_inputs(capacity_factor=-1.0, aux_loss_scope="global_batch", aux_loss_coef=1.0)
    model = torch.nn.Module()
    model.moe = layer
    apply_batch_scope(model, dist.group.WORLD, "global_batch")
    _, aux = layer(x_all[rank * T // 2:(rank + 1) * T // 2])
    aux.backward()
    return {"aux": aux.detach(), "grad": layer.router.weight.grad}


def test_global_batch_scope_at_dp2_equals_one_process_over_the_whole_batch():
    ranks = run_ranks(2, global_scope_rank)
    layer, x_all, _ = layer_and_inputs(capacity_factor=-1.0, aux_loss_scope="micro_batch", aux_loss_coef=1.0)
    _, aux = layer(x_all)
    aux.backward()
    torch.testing.assert_close((ranks[0]["aux"] + ranks[1]["aux"]) / 2, aux.detach())
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, layer.router.weight.grad)
    assert not torch.allclose(ranks[0]["aux"], ranks[1]["aux"])  # f is global, P local


# -- the bias update in training, over the layout ------------------------------------------------------------------

RATE = 0.01
BIAS_ARGS = ("moe.score_func=sigmoid", f"moe.bias_update_rate={RATE}", "train.max_steps=2")


def train_counting_choices(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    """Train 2 steps; record every training forward's router choices per layer (bincount of ids_TK)."""
    torch.manual_seed(0)
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    counts = {}
    for block in trainer.model.layers:
        if block.moe is not None:
            def keep(module, inputs, route, layer_id=block.layer_id):
                if module.training:
                    counts.setdefault(layer_id, []).append(torch.bincount(route.ids_TK.flatten(), minlength=E))
            block.moe.router.register_forward_hook(keep)
    biases, one_step = [], trainer.run_one_step

    def step_and_keep_biases(*args):
        record = one_step(*args)
        biases.append({b.layer_id: b.moe.router.expert_bias.clone() for b in trainer.model.layers if b.moe})
        return record

    trainer.run_one_step = step_and_keep_biases
    trainer.train()
    return {"counts": counts, "biases": biases, "accum": trainer.cfg.train.grad_accum_steps}


def expected_biases(ranks: list[dict], steps: int = 2) -> list[dict]:
    """The formula, step by step: loads summed over every rank's micro-batches of the step."""
    accum, out = ranks[0]["accum"], []
    bias = {layer_id: torch.zeros(E) for layer_id in ranks[0]["counts"]}
    for step in range(steps):
        for layer_id in bias:
            load = sum(r["counts"][layer_id][step * accum + i] for r in ranks for i in range(accum)).float()
            bias[layer_id] = bias[layer_id] + RATE * torch.sign(load.mean() - load)
        out.append(dict(bias))
    return out


@pytest.mark.parametrize("layout", [("parallel.ep=2",), ("parallel.ep=2", "fsdp.enabled=true")],
                         ids=["ep2", "fsdp_ep2"])
def test_bias_update_at_ep2_follows_the_formula_over_two_steps_and_matches_one_process(tmp_path, layout):
    ranks = run_ranks(2, train_counting_choices, overrides("capacity", 2, (*layout, *BIAS_ARGS)),
                      str(tmp_path / "ep2"))
    single = train_counting_choices(0, 1, overrides("capacity", 1, BIAS_ARGS), str(tmp_path / "one"))
    want = expected_biases(ranks)
    assert all(b.abs().sum() > 0 for b in want[0].values())
    for step, biases in enumerate(want):  # after each of the two steps
        for layer_id, bias in biases.items():
            for r in ranks:  # identical on every rank
                torch.testing.assert_close(r["biases"][step][layer_id], bias)
            torch.testing.assert_close(single["biases"][step][layer_id], bias)  # and the same as one process


def test_the_bias_is_checkpointed_and_resumes_exactly(tmp_path):
    args = overrides("capacity", 1, BIAS_ARGS)
    straight = train_counting_choices(0, 1, [*args, "train.max_steps=3"], str(tmp_path / "straight"))
    make_trainer([*args, "checkpoint.every=1", "train.max_steps=1"], 1, 0, tmp_path / "resumed").train()
    manifest = json.loads(next((tmp_path / "resumed" / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert "model/layers.1.moe.router.expert_bias" in manifest["tensors"]
    resumed = make_trainer([*args, "train.max_steps=3", "checkpoint.resume=auto"], 1, 0, tmp_path / "resumed")
    bias = resumed.model.layers[1].moe.router.expert_bias
    assert resumed.step == 1 and bias.abs().sum() > 0
    torch.testing.assert_close(bias, straight["biases"][0][1])
    resumed.train()
    for block in resumed.model.layers:
        if block.moe is not None:
            torch.testing.assert_close(block.moe.router.expert_bias, straight["biases"][-1][block.layer_id])


# -- Mixtral export ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("router", "expert_choice"), ("score_func", "sigmoid"),
                                          ("bias_update_rate", 1e-3)])
def test_mixtral_export_refuses_what_mixtral_cannot_express(field, value):
    from moe_train.interop.hf import check_mixtral_compatible

    moe = MoEConfig(**{"capacity_factor": 1.0, field: value})
    with pytest.raises(ValueError, match=f"moe.{field}={value!r} cannot be expressed as Mixtral"):
        check_mixtral_compatible(ModelConfig(moe_every=1), moe)


def train_with_global_scope(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    from moe_train.parallel.expert_parallel import BatchSumDispatcher

    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    trainer.train()
    moes = list(trainer.model.moe_layers())
    return {"wired": all(isinstance(m.dispatcher, BatchSumDispatcher) and m.dispatcher.batch_group is not None
                         for m in moes), "layers": len(moes)}


@pytest.mark.parametrize("layout", [(), ("parallel.ep=2",)], ids=["dp2", "ep2"])
def test_parallelize_wires_the_global_batch_scope_into_every_dispatcher(tmp_path, layout):
    args = overrides("dropless", 2, (*layout, "moe.aux_loss_scope=global_batch", "train.max_steps=2"))
    for res in run_ranks(2, train_with_global_scope, args, str(tmp_path)):
        assert res["wired"] and res["layers"] == 2
