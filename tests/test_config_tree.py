"""The Hydra config tree: every preset and experiment composes and validates; bad input stops before any work
with an error naming the key, the value and what is allowed."""

from __future__ import annotations


import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from moe_train.cli_config import CONF_DIR, compose_config
from moe_train.config import Config, validate_config
from moe_train.training.trainer import Trainer

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_default_config_is_the_tiny_dropless_moe():
    cfg = compose_config([])
    assert isinstance(cfg, Config)
    validate_config(cfg)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.moe.num_experts, cfg.moe.top_k) == (256, 4, 8, 2)
    assert cfg.moe.dropless and cfg.data.source == "embedded" and cfg.logger.backend == "none"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_config([f"experiment={experiment}"])
    validate_config(cfg)


def test_experiments_are_small_diffs_that_take_effect():
    assert compose_config(["experiment=switch_top1"]).moe.top_k == 1
    assert compose_config(["experiment=switch_top1"]).model.moe_every == 2
    assert compose_config(["experiment=dense_twin"]).model.moe_every == 0
    assert compose_config(["experiment=gshard_top2"]).moe.second_expert_policy == "sampling"
    assert compose_config(["experiment=shakespeare"]).data.source == "text"
    assert compose_config(["experiment=bf16"]).train.mixed_precision == "bf16"
    assert len(EXPERIMENTS) >= 5


@pytest.mark.parametrize("model", MODELS)
def test_every_model_preset_validates(model):
    validate_config(compose_config([f"model={model}", "train.seq_len=128"]))


def test_group_presets_combine_with_models():
    cfg = compose_config(["model=mixtral_8x7b", "moe=switch"])
    assert (cfg.model.d_model, cfg.moe.d_ff, cfg.moe.top_k) == (4096, 14336, 1)


COMPOSE_ERRORS = [
    (["model.d_modle=3"], r"d_modle"),
    (["train.max_steps=abc"], r"abc"),
    (["moe.top_k=2.5"], r"2\.5"),
    (["model=nonexistent"], r"nonexistent"),
    (["train.use_flash=true"], r"use_flash"),
]


@pytest.mark.parametrize("overrides,pattern", COMPOSE_ERRORS, ids=[o[0] for o, _ in COMPOSE_ERRORS])
def test_typos_and_wrong_types_fail_at_compose(overrides, pattern):
    with pytest.raises((HydraException, OmegaConfBaseException)) as info:
        compose_config(overrides)
    text = f"{info.value} {info.value.__cause__}"
    assert __import__("re").search(pattern, text), text


SEMANTIC_ERRORS = [
    (["model.n_heads=7"], r"model\.n_heads=7 must divide model\.d_model=256"),
    (["model.n_kv_heads=3"], r"model\.n_kv_heads=3 must divide model\.n_heads=8"),
    (["moe.top_k=9"], r"moe\.top_k=9 must be between 1 and moe\.num_experts=8"),
    (["train.batch_size=10", "train.grad_accum_steps=4"], r"train\.batch_size=10 must be divisible by "
                                                          r"train\.grad_accum_steps=4"),
    (["train.seq_len=512"], r"train\.seq_len=512 exceeds model\.max_seq_len=256"),
    (["moe.capacity_factor=-3"], r"moe\.capacity_factor=-3\.0 must be a positive number, or -1\.0"),
    (["moe.router=hash"], r"moe\.router='hash' is not supported; allowed: 'topk', 'noisy_topk'"),
    (["optim.schedule=step"], r"optim\.schedule='step' is not supported; allowed: cosine, linear, constant"),
    (["optim.lr=0"], r"optim\.lr=0\.0 must be a positive number"),
    (["optim.min_lr=1.0"], r"optim\.min_lr=1\.0 must be between 0 and optim\.lr"),
    (["train.mixed_precision=fp8"], r"train\.mixed_precision='fp8' is not supported; allowed: none, bf16"),
    (["train.device=tpu"], r"train\.device='tpu' is not supported"),
    (["logger.backend=tensorboard"], r"logger\.backend='tensorboard' is not supported; allowed: none, wandb"),
    (["data=text"], r"data\.path=None"),
    (["data.val_fraction=1.5"], r"data\.val_fraction=1\.5"),
    (["parallel.ep=2"], r"parallel\.ep=2 must be >= 1 and divide the data-parallel size 1"),
    (["parallel.tp=2"], r"parallel\.tp=2 must be >= 1 and divide the world size 1"),
    (["parallel.tp=3"], r"parallel\.tp=3 must be >= 1 and divide the world size 1"),
    (["parallel.backend=mpi"], r"parallel\.backend='mpi' is not supported; allowed: auto, nccl, gloo"),
    (["checkpoint.every=-1"], r"checkpoint\.every=-1 must be >= 0"),
    (["checkpoint.keep_last=0"], r"checkpoint\.keep_last=0 must be >= 1"),
    (["model.moe_every=-1"], r"model\.moe_every=-1 must be >= 0"),
]


@pytest.mark.parametrize("overrides,pattern", SEMANTIC_ERRORS, ids=[" ".join(o) for o, _ in SEMANTIC_ERRORS])
def test_inconsistent_values_fail_validation_naming_key_and_value(overrides, pattern):
    cfg = compose_config(overrides)
    with pytest.raises(ValueError, match=pattern):
        validate_config(cfg)


@pytest.mark.parametrize("overrides,world,pattern", [
    (["parallel.dp=4"], 2, r"parallel\.dp=4 x parallel\.tp=1 must equal the world size 2"),
    (["parallel.ep=4", "moe.num_experts=6"], 4, r"moe\.num_experts=6 is not divisible by parallel\.ep=4"),
    (["parallel.ep=3"], 4, r"parallel\.ep=3 must be >= 1 and divide the data-parallel size 4"),
    (["parallel.tp=4", "model.n_kv_heads=2"], 4, r"model\.n_kv_heads=2 is not divisible by parallel\.tp=4"),
    (["parallel.tp=2", "parallel.expert_tp=true", "moe.d_ff=511"], 2,
     r"moe\.d_ff=511 is not divisible by parallel\.tp=2"),
    (["train.batch_size=10", "train.grad_accum_steps=1"], 4,
     r"train\.batch_size=10 must be divisible by train\.grad_accum_steps=1 x data-parallel size 4"),
])
def test_layout_is_checked_against_the_world_size(overrides, world, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_config(compose_config(overrides), world_size=world)
    assert validate_config(compose_config(["parallel.ep=2"]), world_size=2).edp == 1


SETUP_ERRORS = [
    (["data=text", "data.path=/nonexistent/corpus.txt"], r"data\.path='/nonexistent/corpus\.txt'"),
    (["data.tokenizer=/nonexistent/tok.json"], r"data\.tokenizer='/nonexistent/tok\.json'"),
    (["model.vocab_size=100"], r"model\.vocab_size=100 is smaller than the vocabulary"),
    (["train.batch_size=4096", "data.embedded_size=20000"], r"micro_batch_size"),
]


@pytest.mark.parametrize("overrides,pattern", SETUP_ERRORS, ids=[" ".join(o) for o, _ in SETUP_ERRORS])
def test_bad_data_is_refused_before_training(overrides, pattern, tmp_path):
    cfg = compose_config(overrides)
    validate_config(cfg)
    with pytest.raises(ValueError, match=pattern):
        Trainer(cfg, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
