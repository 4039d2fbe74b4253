"""Bad input is refused at the boundary with a ValueError naming the field, the value and what is allowed;
every preset in conf/moe/ composes against the MoEConfig schema."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import make_layer
from moe_train.config import MoEConfig, register_configs, validate_moe_config
from moe_train.models.moe import MoELayer

CONF_DIR = pathlib.Path(__file__).resolve().parents[1] / "conf" / "moe"

BAD = [
    (dict(top_k=0), r"moe\.top_k=0 .*between 1 and moe\.num_experts=4"),
    (dict(top_k=5), r"moe\.top_k=5 .*between 1 and moe\.num_experts=4"),
    (dict(num_experts=0, top_k=1), r"moe\.num_experts=0 must be >= 1"),
    (dict(capacity_factor=-0.5), r"moe\.capacity_factor=-0\.5 must be a positive number, or -1\.0 for dropless"),
    (dict(capacity_factor=0.0), r"moe\.capacity_factor=0\.0"),
    (dict(eval_capacity_factor=-2.0), r"moe\.eval_capacity_factor=-2\.0"),
    (dict(capacity_factor=float("nan")), r"moe\.capacity_factor=nan"),
    (dict(router="hash"), r"moe\.router='hash' is not supported; allowed: 'topk', 'noisy_topk'"),
    (dict(activation="tanh"), r"moe\.activation='tanh' is not supported; allowed: 'swiglu', 'gelu', 'relu'"),
    (dict(drop_policy="random"), r"moe\.drop_policy='random'.*'position', 'probability'"),
    (dict(aux_loss_counting="last"), r"moe\.aux_loss_counting='last'"),
    (dict(second_expert_policy="random"), r"moe\.second_expert_policy='random'"),
    (dict(second_expert_policy="sampling", top_k=1), r"needs moe\.top_k=2, got moe\.top_k=1"),
    (dict(second_expert_policy="sampling", capacity_factor=-1.0), r"sampling.*dropless"),
    (dict(min_capacity=-1), r"moe\.min_capacity=-1 must be >= 0"),
    (dict(num_shared_experts=-2), r"moe\.num_shared_experts=-2"),
    (dict(aux_loss_coef=-0.1), r"moe\.aux_loss_coef=-0\.1"),
    (dict(routed_scale=0.0), r"moe\.routed_scale=0\.0 must be a finite number > 0"),
    (dict(routed_scale=float("inf")), r"moe\.routed_scale=inf"),
    (dict(jitter_eps=1.5), r"moe\.jitter_eps=1\.5 must be < 1"),
    (dict(d_ff=0), r"moe\.d_ff=0 must be >= 1"),
    (dict(expert_impl="triton"), r"moe\.expert_impl='triton'"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[m for _, m in BAD])
def test_bad_config_raises_value_error_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**overrides)


def test_bad_model_width_at_construction_and_input_width_at_call():
    with pytest.raises(ValueError, match=r"d_model=0 must be >= 1"):
        MoELayer(0, MoEConfig())
    layer = make_layer(d_model=16)
    with pytest.raises(ValueError, match=r"x\.shape\[-1\]=12 does not match d_model=16"):
        layer(torch.randn(3, 12))


def compose_moe(preset: str, conf_dir: pathlib.Path = CONF_DIR.parent, overrides=()):
    """The root config (schema `Config`) with moe=<preset>: every key is checked against the dataclasses."""
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        return compose(config_name="config", overrides=[f"moe={preset}", *overrides])


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_presets_compose_and_validate(path):
    cfg = OmegaConf.to_object(compose_moe(path.stem).moe)  # Hydra validates against the MoEConfig schema
    assert isinstance(cfg, MoEConfig)
    validate_moe_config(cfg, d_model=32)
    layer = MoELayer(32, cfg)
    out, aux = layer(torch.randn(2, 5, 32))
    assert out.shape == (2, 5, 32) and torch.isfinite(aux)


def test_presets_exist():
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} >= {"mixtral", "switch", "gshard", "noisy_topk"}


def test_unknown_key_or_wrong_type_in_preset_is_rejected(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR.parent, conf)
    (conf / "moe" / "typo.yaml").write_text("num_expert: 8\n")
    with pytest.raises(Exception, match="num_expert"):
        compose_moe("typo", conf)
    with pytest.raises(Exception, match="top_k"):
        compose_moe("mixtral", overrides=["moe.top_k=two"])
