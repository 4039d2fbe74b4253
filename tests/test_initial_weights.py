"""`init.from`: initial weights from our weights file, a checkpoint or a Hugging Face directory, into any layout;
sparse upcycling of a dense model (the MoE computes the dense function at step 0); clear errors before training."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig
from moe_train.config.init import init_config, validate_init_config
from moe_train.interop.hf import save_weights
from moe_train.interop.initial import load_initial_weights
from moe_train.models.transformer import build_model

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, moe_every=0,
                    max_seq_len=32)
MOE = MoEConfig(num_experts=4, top_k=2, d_ff=64, capacity_factor=-1, eval_capacity_factor=-1)


def trained_like(model_cfg: ModelConfig, moe_cfg: MoEConfig = MOE, seed: int = 1):
    """A model whose weights are not the init's (norms away from one), as a trained source would be."""
    model = build_model(model_cfg, moe_cfg, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def save(model, tmp_path: pathlib.Path, name: str = "src") -> str:
    path = tmp_path / f"{name}.safetensors"
    save_weights(model, path)
    return str(path)


def load(model_cfg, moe_cfg, path, seed: int = 7, **init):
    model = build_model(model_cfg, moe_cfg, seed=seed)
    load_initial_weights(model, init_config(path, **init), seed, say=lambda msg: None)
    return model.eval()


def ids(batch: int = 3, seq: int = 19, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def test_weights_file_loads_every_tensor_bitwise(tmp_path):
    src = trained_like(DENSE)
    loaded = load(DENSE, MOE, save(src, tmp_path))
    for (name, a), (_, b) in zip(src.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("g, top_k, routed_scale, moe_every", [(1, 2, 1.0, 1), (1, 1, 1.0, 1), (1, 2, 2.0, 2),
                                                               (2, 2, 1.0, 1), (2, 4, 2.0, 2), (4, 4, 1.0, 1)])
def test_upcycled_moe_computes_the_dense_function(tmp_path, g, top_k, routed_scale, moe_every):
    dense = trained_like(DENSE)
    num_experts = 4 * g if g > 1 else 4
    moe_cfg = dataclasses.replace(MOE, num_experts=num_experts, top_k=top_k, d_ff=DENSE.d_ff // g,
                                  routed_scale=routed_scale)
    moe_model_cfg = dataclasses.replace(DENSE, moe_every=moe_every)
    moe = load(moe_model_cfg, moe_cfg, save(dense, tmp_path), upcycle=True, upcycle_granularity=g)
    assert sum(1 for _ in moe.moe_layers()) == (2 if moe_every == 1 else 1)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids()), dense(ids()), atol=1e-5, rtol=0)


def test_upcycled_experts_are_copies_and_noise_breaks_the_symmetry(tmp_path):
    path = save(trained_like(DENSE), tmp_path)
    moe_cfg = dataclasses.replace(DENSE, moe_every=1)
    plain = load(moe_cfg, MOE, path, upcycle=True)
    w1 = next(plain.moe_layers()).experts.w1
    assert all(torch.equal(w1[0], w1[e]) for e in range(1, 4))
    noisy = load(moe_cfg, MOE, path, upcycle=True, upcycle_noise=0.01)
    w1n = next(noisy.moe_layers()).experts.w1
    assert not torch.equal(w1n[0], w1n[1])
    relative = (w1n - w1).std() / w1.std()
    assert 0.005 < relative < 0.02
    again = load(moe_cfg, MOE, path, upcycle=True, upcycle_noise=0.01)
    assert torch.equal(next(again.moe_layers()).experts.w1, w1n)  # drawn per (seed, parameter, expert)


def test_shape_mismatch_lists_every_differing_tensor_and_the_path(tmp_path):
    path = save(trained_like(DENSE), tmp_path)
    wider = dataclasses.replace(DENSE, d_ff=96)
    with pytest.raises(ValueError) as err:
        load(wider, MOE, path)
    message = str(err.value)
    assert path in message and "6 tensor(s) differ" in message
    assert "layers.0.feed_forward.w1.weight: source [64, 32], this run [96, 32]" in message
    assert "model.d_ff=96 (source 64)" in message


@pytest.mark.parametrize("what, expected", [("missing", "does not exist"), ("garbage", "cannot read")])
def test_missing_or_unreadable_source_names_the_path(tmp_path, what, expected):
    path = tmp_path / "w.safetensors"
    if what == "garbage":
        save(trained_like(DENSE), tmp_path, "w")
        path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=expected) as err:
        load(DENSE, MOE, str(path))
    assert str(path) in str(err.value)


def test_upcycle_needs_a_dense_source_and_matching_widths(tmp_path):
    moe_cfg = dataclasses.replace(DENSE, moe_every=1)
    with pytest.raises(ValueError, match="needs a dense source"):
        load(moe_cfg, MOE, save(trained_like(moe_cfg), tmp_path, "moe"), upcycle=True)
    with pytest.raises(ValueError, match=r"init.upcycle_granularity=1 needs \[32, 32\]"):
        load(moe_cfg, dataclasses.replace(MOE, d_ff=32), save(trained_like(DENSE), tmp_path), upcycle=True)


@pytest.mark.parametrize("change, message", [
    ({"top_k": 3}, "moe.top_k=3 is not a multiple of init.upcycle_granularity=2"),
    ({"num_experts": 5}, "moe.num_experts=5 is not a multiple"),
    ({"activation": "gelu"}, "moe.activation='gelu'"),
    ({"num_shared_experts": 1}, "moe.num_shared_experts=1"),
])
def test_upcycle_config_is_validated_before_any_file_is_read(change, message):
    cfg = init_config("/nonexistent.safetensors", upcycle=True, upcycle_granularity=2)
    with pytest.raises(ValueError, match=message):
        validate_init_config(cfg, 1, dataclasses.replace(MOE, **{"num_experts": 8, "top_k": 2, **change}))
