"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moe_train.config import ModelConfig, MoEConfig, OptimConfig
from moe_train.models.transformer import build_model
from moe_train.training.optim import build_optimizer, build_scheduler, lr_at, param_groups

CFG = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="cosine")


def test_warmup_is_linear_to_peak():
    assert lr_at(0, CFG, 100) == pytest.approx(1e-4)
    assert lr_at(9, CFG, 100) == pytest.approx(1e-3)


@pytest.mark.parametrize("schedule,mid", [("cosine", 5.5e-4), ("linear", 5.5e-4), ("constant", 1e-3)])
def test_decay_schedules(schedule, mid):
    cfg = dataclasses.replace(CFG, schedule=schedule)
    assert lr_at(55, cfg, 100) == pytest.approx(mid)
    end = 1e-3 if schedule == "constant" else 1e-4
    assert lr_at(100, cfg, 100) == pytest.approx(end) and lr_at(500, cfg, 100) == pytest.approx(end)


def test_cosine_shape_and_explicit_decay_steps():
    cfg = dataclasses.replace(CFG, decay_steps=58)
    assert lr_at(58, cfg, 1000) == pytest.approx(1e-4)
    expected = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25))  # (22 - 10) / (58 - 10) of the way
    assert lr_at(22, cfg, 1000) == pytest.approx(expected)


def test_scheduler_drives_the_optimizer_lr():
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, CFG)
    sched = build_scheduler(opt, CFG, 100)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(i, CFG, 100) for i in range(12)])


@pytest.mark.parametrize("tie", [False, True])
def test_no_weight_decay_on_norms_biases_and_embeddings(tie):
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=8,
                      moe_every=2, tie_embeddings=tie)
    model = build_model(cfg, MoEConfig(num_experts=2, top_k=1, d_ff=8))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in no_decay_names and all("norm" in n or "embed" in n for n in no_decay_names)
    assert {names[id(p)] for p in decay["params"]} >= {"layers.1.moe.experts.w1", "layers.0.attention.wq.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])
def test_single_process_clipping_matches_torch(max_norm):
    from moe_train.parallel.data_parallel import clip_grad_norm
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                                    max_seq_len=16), MoEConfig(num_experts=4, top_k=2, d_ff=8))
    logits, aux = model(torch.randint(0, 32, (2, 8)), return_aux=True)
    (logits.square().mean() + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = clip_grad_norm(model, max_norm, None)
    ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    torch.testing.assert_close(norm, ref)
    scale = min(1.0, max_norm / (float(ref) + 1e-6)) if max_norm > 0 else 1.0
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name] * scale, msg=name)


def test_clipping_without_gradients_returns_zero():
    from moe_train.parallel.data_parallel import clip_grad_norm
    model = torch.nn.Linear(3, 2)
    assert float(clip_grad_norm(model, 1.0, None)) == 0.0
