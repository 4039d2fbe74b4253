"""Mixtral interop: our model loaded from a transformers checkpoint computes the same logits, and saving it back
reproduces the checkpoint tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig
from moe_train.interop import (config_from_hf, config_to_hf, load_mixtral, load_weights, save_mixtral, save_weights,
                               state_dict_from_hf, state_dict_to_hf)
from moe_train.interop.cli import main
from moe_train.interop.hf import parse_size, plan_shards
from moe_train.models.transformer import build_model

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
VARIANTS = {"untied": dict(rope_theta=1e6), "tied": dict(rope_theta=12345.0, tie_word_embeddings=True)}


def make_hf(seed: int = 0, **overrides) -> MixtralForCausalLM:
    """Random weights far from init (std 0.1, norms around 1) so routing and RoPE matter."""
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_pair(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory)."""
    model = make_hf(**VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def read_safetensors(path: Path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_logits_equal_transformers(hf_pair):
    hf, path = hf_pair
    ours = load_mixtral(path)
    assert not ours.training and ours.cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    ids = torch.randint(0, TINY["vocab_size"], (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_save_mixtral_reproduces_checkpoint(hf_pair, tmp_path):
    hf, path = hf_pair
    save_mixtral(load_mixtral(path), tmp_path)
    assert_same_tensors(read_safetensors(tmp_path), read_safetensors(path))
    original = json.loads((path / "config.json").read_text())
    assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == config_from_hf(original)
    reloaded = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_sharded_save_loads_in_both(hf_pair, tmp_path):
    hf, path = hf_pair
    save_mixtral(load_mixtral(path), tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    assert_same_tensors(read_safetensors(tmp_path), read_safetensors(path))
    ours, theirs = load_mixtral(tmp_path), MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    save_mixtral(ours, tmp_path)  # a smaller save over a sharded one leaves no stale shard or index behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_fused_in_memory_state_dict_gives_same_weights(hf_pair):
    hf, path = hf_pair
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    model_cfg, moe_cfg = config_from_hf(hf.config.to_dict())
    ours = state_dict_from_hf(hf.state_dict(), model_cfg, moe_cfg)
    assert_same_tensors(ours, load_mixtral(path).state_dict())
    assert_same_tensors(state_dict_to_hf(ours, model_cfg, moe_cfg), read_safetensors(path))


def test_bfloat16_load_keeps_router_float32(hf_pair):
    _, path = hf_pair
    ours = load_mixtral(path, dtype=torch.bfloat16)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    assert ours.layers[0].moe.experts.w1.dtype == torch.bfloat16
    assert ours.layers[0].moe.router.weight.dtype == torch.float32


def test_config_round_trip_and_mixtral_semantics():
    hf_config = {**MixtralConfig(**TINY, rope_theta=777.0, router_aux_loss_coef=0.02).to_dict()}
    model_cfg, moe_cfg = config_from_hf(hf_config)
    assert (model_cfg.d_model, model_cfg.n_kv_heads, model_cfg.rope_theta, model_cfg.moe_every) == (64, 2, 777.0, 1)
    assert (moe_cfg.num_experts, moe_cfg.top_k, moe_cfg.d_ff, moe_cfg.aux_loss_coef) == (4, 2, 96, 0.02)
    assert moe_cfg.dropless and moe_cfg.eval_capacity_factor == -1 and moe_cfg.renormalize
    assert moe_cfg.aux_loss_counting == "all" and moe_cfg.activation == "swiglu"
    back = config_to_hf(model_cfg, moe_cfg)
    assert config_from_hf(back) == (model_cfg, moe_cfg)
    assert back["architectures"] == ["MixtralForCausalLM"] and back["rope_parameters"]["rope_theta"] == 777.0
    assert {k: back[k] for k in TINY} == TINY


def test_legacy_top_level_rope_theta():
    legacy = {**config_to_hf(*config_from_hf({**TINY, "model_type": "mixtral"}))}
    del legacy["rope_parameters"]
    legacy.update(rope_theta=4321.0, rope_scaling=None)
    assert config_from_hf(legacy)[0].rope_theta == 4321.0
    nested = {**legacy, "rope_scaling": {"rope_theta": 4321.0, "rope_type": "default"}}
    assert config_from_hf(nested)[0].rope_theta == 4321.0


@pytest.mark.parametrize("change, match", [
    ({"model_type": "llama"}, "model_type='llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"sliding_window": 16}, "sliding_window=16"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_parameters": {"rope_theta": 1.0, "rope_type": "default"}, "rope_theta": 2.0}, "two different RoPE"),
])
def test_config_from_hf_rejects_what_we_cannot_compute(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**TINY, "model_type": "mixtral", **change})


def test_sliding_window_covering_every_position_is_accepted():
    config_from_hf({**TINY, "model_type": "mixtral", "sliding_window": TINY["max_position_embeddings"]})


@pytest.mark.parametrize("model_change, moe_change, match", [
    ({"moe_every": 2}, {}, "model.moe_every=2"),
    ({}, {"activation": "gelu"}, "moe.activation='gelu'"),
    ({}, {"num_shared_experts": 1}, "moe.num_shared_experts=1"),
    ({}, {"renormalize": False}, "moe.renormalize=False"),
    ({}, {"router": "noisy_topk"}, "moe.router='noisy_topk'"),
])
def test_save_mixtral_refuses_non_mixtral_models(tmp_path, model_change, moe_change, match):
    model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                                    max_seq_len=16, **model_change),
                        MoEConfig(num_experts=2, top_k=1, d_ff=8, **moe_change))
    with pytest.raises(ValueError, match=match):
        save_mixtral(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_unknown_missing_and_misshaped_keys_are_named(hf_pair):
    hf, _ = hf_pair
    model_cfg, moe_cfg = config_from_hf(hf.config.to_dict())
    sd = dict(hf.state_dict())
    with pytest.raises(ValueError, match=r"unexpected keys \[model.layers.0.extra.weight\]"):
        state_dict_from_hf({**sd, "model.layers.0.extra.weight": torch.zeros(1)}, model_cfg, moe_cfg)
    del sd["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing keys \[model.norm.weight\]"):
        state_dict_from_hf(sd, model_cfg, moe_cfg)
    sd["model.norm.weight"] = torch.ones(1)  # would broadcast silently into copy_
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(1,\), the config expects \(64,\)"):
        state_dict_from_hf(sd, model_cfg, moe_cfg)


def test_load_mixtral_path_errors(hf_pair, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_mixtral(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_mixtral(tmp_path)
    (tmp_path / "config.json").write_text((hf_pair[1] / "config.json").read_text())
    with pytest.raises(ValueError, match=r"no \*.safetensors"):
        load_mixtral(tmp_path)


def test_cli_round_trip(hf_pair, tmp_path):
    hf, path = hf_pair
    weights = tmp_path / "ours.safetensors"
    assert main(["from-hf", str(path), str(weights)]) == 0
    sidecar = json.loads((tmp_path / "ours.json").read_text())
    assert sidecar["format"] == "moe_train.weights"
    assert sidecar["model"]["tie_embeddings"] == hf.config.tie_word_embeddings
    assert_same_tensors(load_weights(weights).state_dict(), load_mixtral(path).state_dict())
    assert main(["to-hf", str(weights), str(tmp_path / "hf"), "--max-shard-size", "1MB"]) == 0
    assert_same_tensors(read_safetensors(tmp_path / "hf"), read_safetensors(path))


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["from-hf", str(tmp_path / "missing"), str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-train-convert: error: ") and "missing" in err and "Traceback" not in err
    assert main(["to-hf", str(tmp_path / "w.safetensors"), str(tmp_path / "out")]) == 2
    assert main(["from-hf", str(tmp_path), str(tmp_path / "w.bin")]) == 2
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**TINY, "model_type": "mixtral"}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "w.safetensors")]) == 2
    assert "cannot read safetensors file" in capsys.readouterr().err


def test_weights_file_round_trips_any_model(tmp_path):
    """Our own format holds what Mixtral cannot (dense layers, GELU experts, shared experts)."""
    model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                                    max_seq_len=16, moe_every=2, tie_embeddings=True),
                        MoEConfig(num_experts=2, top_k=1, d_ff=8, activation="gelu", num_shared_experts=1)).eval()
    save_weights(model, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors")
    assert (loaded.cfg, loaded.moe_cfg) == (model.cfg, model.moe_cfg)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_routed_scale_is_folded_into_the_experts_on_export(tmp_path):
    """The tiny preset scales the routed output by 2; as a Mixtral the same function has w2 scaled instead."""
    model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                                    max_seq_len=16),
                        MoEConfig(num_experts=4, top_k=2, d_ff=8, capacity_factor=-1.0, eval_capacity_factor=-1.0,
                                  routed_scale=2.0)).eval()
    save_mixtral(model, tmp_path)
    hf = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert load_mixtral(tmp_path).moe_cfg.routed_scale == 1.0


def test_shard_size_parsing_and_planning():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
        parse_size("5 parsecs")
    assert plan_shards([("a", 6), ("b", 5), ("c", 20), ("d", 1)], 10) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards([("a", 4), ("b", 5), ("c", 2)], 10) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("family, extra", [("Llama", {"attention_bias": False}), ("Mistral", {"sliding_window": None})])
def test_dense_hf_converts_and_equals_transformers(tmp_path, family, extra):
    shape = {k: v for k, v in TINY.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    hf = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**shape, **extra))
    hf.eval().save_pretrained(tmp_path / "hf")
    assert main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "w.safetensors")]) == 0
    ours = load_weights(tmp_path / "w.safetensors")
    assert ours.cfg.moe_every == 0 and ours.cfg.d_ff == TINY["intermediate_size"]
    ids = torch.randint(0, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, match", [({"attention_bias": True}, "attention_bias=True"),
                                           ({"sliding_window": 16}, "sliding_window=16"),
                                           ({"model_type": "gpt2"}, "model_type='gpt2'")])
def test_dense_hf_settings_we_cannot_compute_are_refused(change, match):
    from moe_train.interop.hf_dense import dense_config_from_hf

    with pytest.raises(ValueError, match=match):
        dense_config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **change})
