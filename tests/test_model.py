"""The transformer: meta-device build, shapes, layer layout, causality, GQA, autocast, parameter counts, and the
model-level oracle (a 1-expert top-1 MoE model equals its dense twin with the same weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moe_train.config import ModelConfig, MoEConfig
from moe_train.models.params import count_parameters
from moe_train.models.transformer import Transformer, apply_rope, build_model

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16)
DROPLESS = MoEConfig(num_experts=4, top_k=2, d_ff=24, capacity_factor=-1.0, eval_capacity_factor=-1.0)


def small(**model_overrides) -> Transformer:
    torch.manual_seed(0)
    return build_model(dataclasses.replace(SMALL, **model_overrides), DROPLESS)


def test_meta_build_then_init_materialises_every_tensor():
    model = small()
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and torch.isfinite(p).all(), name
        assert p.ndim == 1 or p.std() > 0.01, name  # initialised, not left empty or zero
    assert "rope_cos" not in model.state_dict()  # recomputed, never checkpointed
    assert torch.allclose(model.rope_cos[0], torch.ones(SMALL.head_dim))


def test_forward_shapes_and_aux_loss():
    model = small()
    ids = torch.randint(0, 64, (3, 11))
    logits, aux = model(ids, return_aux=True)
    assert logits.shape == (3, 11, 64) and aux.ndim == 0 and aux > 0
    assert torch.equal(model(ids), logits)


@pytest.mark.parametrize("moe_every,expected", [(1, [0, 1, 2, 3]), (2, [1, 3]), (0, [])])
def test_moe_every_places_the_moe_layers(moe_every, expected):
    model = small(n_layers=4, moe_every=moe_every)
    assert [b.layer_id for b in model.layers if b.moe is not None] == expected
    assert all((b.moe is None) != (b.feed_forward is None) for b in model.layers)


def test_tied_embeddings_share_one_parameter():
    model = small(tie_embeddings=True)
    assert model.output is None
    untied = count_parameters(small()).total
    assert count_parameters(model).total == untied - 64 * 32


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = small().eval()
    ids = torch.randint(0, 64, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    assert torch.allclose(model(ids)[:, :8], model(changed)[:, :8], atol=1e-6)


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds model\.max_seq_len=16"):
        small()(torch.zeros(1, 17, dtype=torch.long))


def test_gqa_attention_equals_explicit_repeated_kv_reference():
    attn = small().layers[0].attention
    x = torch.randn(2, 9, 32)
    cos, sin = small().rope_cos[:9], small().rope_sin[:9]
    q = apply_rope(attn.wq(x).view(2, 9, 4, 8).transpose(1, 2), cos, sin)
    k = apply_rope(attn.wk(x).view(2, 9, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5 + torch.full((9, 9), float("-inf")).triu(1)
    ref = attn.wo((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 9, 32))
    assert torch.allclose(attn(x, cos, sin), ref, atol=1e-5)


def test_one_expert_top1_model_equals_dense_twin_with_same_weights():
    one = MoEConfig(num_experts=1, top_k=1, d_ff=48, capacity_factor=-1.0, eval_capacity_factor=-1.0,
                    aux_loss_coef=0.0)
    torch.manual_seed(0)
    moe_model = build_model(SMALL, one)
    dense = build_model(dataclasses.replace(SMALL, moe_every=0), one)
    state = {k: v for k, v in moe_model.state_dict().items() if ".moe." not in k}
    for i, block in enumerate(moe_model.layers):
        for w in ("w1", "w2", "w3"):
            state[f"layers.{i}.feed_forward.{w}.weight"] = getattr(block.moe.experts, w)[0]
    dense.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 13))
    assert torch.allclose(moe_model(ids), dense(ids), atol=1e-5)


def test_bf16_autocast_trains_with_float32_router_and_master_weights():
    model = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(torch.randint(0, 64, (2, 8)), return_aux=True)
    assert logits.dtype == torch.bfloat16 and aux.dtype == torch.float32
    (logits.float().logsumexp(-1).mean() + aux).backward()
    router = model.layers[0].moe.router.weight
    assert router.dtype == torch.float32 and torch.isfinite(router.grad).all() and router.grad.abs().sum() > 0
    assert model.layers[0].moe.experts.w1.grad.dtype == torch.float32


def test_dense_twin_has_the_active_parameters_of_the_moe():
    moe = count_parameters(build_model(SMALL, DROPLESS))
    twin = count_parameters(build_model(dataclasses.replace(SMALL, moe_every=0, d_ff=2 * 24), DROPLESS))
    routers = SMALL.n_layers * 4 * 32
    assert twin.total == twin.active == moe.active - routers
    assert moe.total - moe.active == SMALL.n_layers * 2 * 3 * 24 * 32  # 2 of 4 experts idle per token


def test_moe_train_params_prints_mixtral_8x7b_counts(capsys):
    from moe_train.params import main

    main(["model=mixtral_8x7b"])
    out = capsys.readouterr().out
    total = float(out.split("total parameters:")[1].split("(")[1].split("B")[0])
    active = float(out.split("active per token:")[1].split("(")[1].split("B")[0])
    assert abs(total / 46.7 - 1) < 0.005 and abs(active / 12.9 - 1) < 0.005, out
