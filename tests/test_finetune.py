"""Fine-tuning: `finetune.freeze` (frozen parameters get no gradient, no optimizer state, no all-reduce and stay
bitwise unchanged, also under ep2 and ZeRO-2; a frozen run resumes exactly), `moe.expert_dropout`, and `init.from`
through the trainer (HF Llama, checkpoints, upcycling under expert parallelism, the resumed checkpoint winning)."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from moe_train.config.finetune import FinetuneConfig, validate_finetune_config
from moe_train.interop.hf import load_checkpoint_weights, load_weights, save_weights
from moe_train.models.moe.expert_loop import expert_loop
from moe_train.models.param_groups import freeze, param_group
from moe_train.models.transformer import build_model
from moe_train.parallel.parallelize import gather_full
from helpers import make_layer
from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides
from test_initial_weights import DENSE, MOE

NON_MOE = ("attention", "dense_ffn", "embeddings", "norms", "lm_head")


def freeze_arg(groups) -> str:
    return f"finetune.freeze=[{','.join(groups)}]"


def dense_weights(tmp_path: pathlib.Path) -> str:
    """A dense model shaped like test_distributed_train's SMALL config (d_ff = top_k x moe.d_ff), saved."""
    trainer = make_trainer(overrides("dropless", 1, ("model.moe_every=0",)), 1, 0, tmp_path / "dense")
    path = tmp_path / "dense.safetensors"
    save_weights(trainer.model, path)
    return str(path)


def full_params(trainer) -> dict[str, torch.Tensor]:
    """Collective: the whole parameters (experts gathered over ep), cloned."""
    params = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return gather_full(trainer.model, trainer.ctx, params) if trainer.ctx.groups is not None else params


def frozen_run(rank: int, world_size: int, args: list[str], run_dir: str) -> dict:
    torch.manual_seed(0)
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    start = full_params(trainer)
    frozen = sorted(name for name, p in trainer.model.named_parameters() if not p.requires_grad)
    trainer.compute_gradients()
    with_grad = sorted(name for name, p in trainer.model.named_parameters() if p.grad is not None)
    trainer.engine.step(None)
    trainer.step = 1
    trainer.train()
    optimizer = trainer.optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen_in_optimizer = [name for name, p in trainer.model.named_parameters()
                           if not p.requires_grad and (id(p) in in_optimizer or p in optimizer.state)]
    return {"start": start, "end": full_params(trainer), "frozen": frozen, "with_grad": with_grad,
            "frozen_in_optimizer": frozen_in_optimizer}


@pytest.fixture(scope="module")
def dense_source(tmp_path_factory):
    return dense_weights(tmp_path_factory.mktemp("dense"))


def finetune_args(source: str, dp: int, extra: tuple[str, ...] = ()) -> list[str]:
    return overrides("dropless", dp, ("train.max_steps=3", f"init.from={source}", "init.upcycle=true",
                                      "init.upcycle_granularity=2",
                                      "init.upcycle_noise=0.01", freeze_arg(NON_MOE), *extra))


def check_frozen(result: dict, grads_in_params: bool = True) -> None:
    """grads_in_params: False under ZeRO 2, which keeps the reduced gradients in its own partitions."""
    assert result["frozen"] and (result["with_grad"] or not grads_in_params)
    assert not set(result["frozen"]) & set(result["with_grad"])
    assert all(param_group(name) in NON_MOE for name in result["frozen"])
    for name, start in result["start"].items():
        unchanged = torch.equal(start, result["end"][name])
        assert unchanged == (name in result["frozen"]), name


@pytest.fixture(scope="module")
def single_frozen(dense_source, tmp_path_factory):
    return frozen_run(0, 1, finetune_args(dense_source, 1), str(tmp_path_factory.mktemp("single")))


def test_frozen_parameters_get_no_gradient_no_state_and_stay_bitwise_unchanged(single_frozen):
    check_frozen(single_frozen)
    assert single_frozen["frozen_in_optimizer"] == []


@pytest.mark.parametrize("layout", ["ep2", "zero2", "fsdp_ep2"])
def test_freezing_under_ep2_zero2_and_fsdp(single_frozen, dense_source, tmp_path, layout):
    extra = {"ep2": ("parallel.ep=2",), "zero2": ("zero.stage=2",),
             "fsdp_ep2": ("fsdp.enabled=true", "parallel.ep=2")}[layout]
    results = run_ranks(2, frozen_run, finetune_args(dense_source, 2, extra), str(tmp_path))
    for result in results:
        check_frozen(result, grads_in_params=layout != "zero2")
        for name, value in single_frozen["start"].items():  # upcycled init (noise included): layout-independent
            assert torch.equal(result["start"][name], value), name
        for name, value in single_frozen["end"].items():
            assert torch.allclose(result["end"][name], value, atol=1e-6, rtol=1e-5), name
    if layout == "ep2":
        assert results[0]["frozen_in_optimizer"] == []


def test_frozen_run_resumes_exactly(dense_source, tmp_path, capsys):
    args = finetune_args(dense_source, 1, ("optim.schedule=constant", "checkpoint.every=2"))
    straight = make_trainer([*args, "train.max_steps=4"], 1, 0, tmp_path / "straight")
    straight.train()
    make_trainer([*args, "train.max_steps=2"], 1, 0, tmp_path / "split").train()
    resumed = make_trainer([*args, "train.max_steps=4", "checkpoint.resume=auto"], 1, 0, tmp_path / "split")
    assert "it wins over init.from" in capsys.readouterr().out
    resumed.train()
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_init_from_a_checkpoint_directory_loads_its_weights(tmp_path):
    run = make_trainer(overrides("dropless", 1, ("train.max_steps=2", "checkpoint.every=2")), 1, 0, tmp_path / "a")
    run.train()
    source = load_checkpoint_weights(tmp_path / "a" / "checkpoints" / "step_00000002")
    for path in (tmp_path / "a" / "checkpoints", tmp_path / "a" / "checkpoints" / "step_00000002"):
        loaded = make_trainer(overrides("dropless", 1, (f"init.from={path}", "train.seed=5")), 1, 0, tmp_path / "b")
        assert loaded.step == 0
        for (name, a), (_, b) in zip(source.named_parameters(), loaded.model.named_parameters()):
            assert torch.equal(a, b), name


HF_SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
HF_ARMS = {  # name: (transformers config class, extra config keys, our overrides)
    "llama": ("LlamaConfig", {}, ("model.moe_every=0",)),
    "mistral": ("MistralConfig", {"sliding_window": None}, ("model.moe_every=0",)),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
                ("moe.d_ff=64", "moe.routed_scale=1.0", "moe.aux_loss_counting=all")),
    "llama_upcycled": ("LlamaConfig", {}, ("init.upcycle=true", "moe.d_ff=64")),
}


@pytest.mark.parametrize("arm", sorted(HF_ARMS))
def test_init_from_hf_matches_transformers_logits(tmp_path, arm):
    transformers = pytest.importorskip("transformers")
    config_class, extra, ours = HF_ARMS[arm]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**HF_SHAPE, **extra)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    shape = ("model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
             "model.max_seq_len=64", f"model.norm_eps={config.rms_norm_eps}",
             f"model.rope_theta={config.rope_parameters['rope_theta']}", f"init.from={tmp_path / 'hf'}")
    trainer = make_trainer(overrides("dropless", 1, (*shape, *ours)), 1, 0, tmp_path / "run")
    ids = torch.randint(0, 256, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)


# -- freeze groups and expert dropout ------------------------------------------------------------------------------

def test_every_parameter_is_in_one_group_and_freezing_sets_requires_grad():
    model = build_model(dataclasses.replace(DENSE, moe_every=2), dataclasses.replace(MOE, num_shared_experts=1,
                                                                                    router="noisy_topk"))
    groups = {param_group(name) for name, _ in model.named_parameters()}
    assert groups == {"router", "experts", "shared_experts", "attention", "dense_ffn", "embeddings", "norms",
                      "lm_head"}
    frozen = freeze(model, ["router", "norms"])
    assert "layers.1.moe.router.noise_weight" in frozen and "norm.weight" in frozen
    assert all(p.requires_grad == (name not in frozen) for name, p in model.named_parameters())
    with pytest.raises(ValueError, match="freezes every parameter"):
        freeze(model, sorted(groups))


@pytest.mark.parametrize("freeze_list, tied, message", [
    (["routers"], False, r"unknown group\(s\) \['routers'\]; allowed: router, experts"),
    (["lm_head"], True, "model.tie_embeddings=true makes the embedding and the LM head one tensor"),
])
def test_freeze_config_is_validated(freeze_list, tied, message):
    with pytest.raises(ValueError, match=message):
        validate_finetune_config(FinetuneConfig(freeze=freeze_list), tied)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("dropless", [True, False])
def test_expert_dropout_acts_in_training_only(impl, dropless):
    cf = -1.0 if dropless else 2.0
    layer = make_layer(expert_impl=impl, expert_dropout=0.5, capacity_factor=cf, eval_capacity_factor=cf)
    reference = make_layer(expert_impl=impl, capacity_factor=cf, eval_capacity_factor=cf)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(40, 16)
    layer.eval(), reference.eval()
    assert torch.equal(layer(x)[0], reference(x)[0])
    layer.train(), reference.train()
    torch.manual_seed(0)
    dropped, _ = layer(x)
    torch.manual_seed(0)
    assert not torch.allclose(dropped, reference(x)[0])
    dropped.sum().backward()
    assert all(p.grad is not None for p in layer.experts.parameters())


def test_expert_loop_dropout_backward_matches_finite_differences():
    torch.manual_seed(0)
    E, F, D = 3, 5, 4
    x, w1, w3 = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((7, D), (E, F, D),
                                                                                          (E, F, D)))
    w2 = torch.randn(E, D, F, dtype=torch.float64, requires_grad=True)
    groups = [(0, 0, 3), (1, 3, 0), (2, 3, 4)]

    def fn(x, w1, w2, w3):
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the same dropout mask on every evaluation
            return expert_loop(x, w1, w2, w3, groups, "swiglu", dropout=0.4)

    assert torch.autograd.gradcheck(fn, (x, w1, w2, w3))
    kept = (fn(x, w1, w2, w3) != expert_loop(x, w1, w2, w3, groups, "swiglu")).any()
    assert kept
