"""Distillation (distill.*): the KL term, the combined objective through the Trainer, a frozen teacher, dp2 equal to
one process, and the vocabulary check."""

from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn.functional as F

from moe_train.config.distill import DistillConfig, validate_distill_config
from moe_train.interop.hf import save_weights
from moe_train.training.distill import distill_kl
from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides


def test_kl_is_zero_for_equal_logits_and_matches_the_definition():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    counted = torch.tensor([[True, True, False], [True, False, True]])
    assert distill_kl(teacher, teacher, counted, 2.0) == pytest.approx(0.0, abs=1e-6)
    t = 2.0
    p = F.softmax(teacher / t, -1)
    expected = (p * (p.log() - F.log_softmax(student / t, -1))).sum(-1)[counted].mean() * t * t
    torch.testing.assert_close(distill_kl(student, teacher, counted, t), expected)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A trained-for-a-few-steps MoE of the SMALL shape, saved as a weights file."""
    work = tmp_path_factory.mktemp("teacher")
    trainer = make_trainer(overrides("dropless", 1, ("train.max_steps=3",)), 1, 0, work)
    trainer.train()
    save_weights(trainer.model, work / "teacher.safetensors")
    return str(work / "teacher.safetensors")


def student_args(teacher: str, dp: int, *extra: str) -> list[str]:
    return overrides("dropless", dp, ("model.moe_every=0", f"distill.teacher={teacher}", "distill.alpha=0.25",
                                      "distill.temperature=2.0", *extra))


def test_objective_is_alpha_ce_plus_kl_and_the_teacher_stays_frozen(teacher_path, tmp_path):
    trainer = make_trainer(student_args(teacher_path, 1), 1, 0, tmp_path)
    before = [p.clone() for p in trainer.teacher.model.parameters()]
    inputs, targets = trainer.data.train.next_batch()
    ce, rest = trainer.forward_loss(inputs, targets)
    with torch.no_grad():
        kl = distill_kl(trainer.model(inputs), trainer.teacher.logits(inputs), torch.ones_like(targets, dtype=bool),
                        2.0)
    torch.testing.assert_close(ce + rest, 0.25 * ce + 0.75 * kl)
    trainer.train()
    assert not trainer.teacher.model.training
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.teacher.model.parameters()))
    assert all(not p.requires_grad for p in trainer.teacher.model.parameters())


def distill_losses(rank: int, world_size: int, args: list[str], run_dir: str) -> list[float]:
    torch.manual_seed(0)
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    losses = []
    for _ in range(3):
        loss, _, _ = trainer.train_step(collect_stats=False)
        losses.append(float(loss))
    return losses


def test_data_parallel_distillation_equals_one_process(teacher_path, tmp_path):
    single = distill_losses(0, 1, student_args(teacher_path, 1), str(tmp_path / "one"))
    dp2 = run_ranks(2, distill_losses, student_args(teacher_path, 2), str(tmp_path / "two"))
    mean = [(a + b) / 2 for a, b in zip(*dp2)]  # each rank's mean over its micro-batches
    assert mean == pytest.approx(single, abs=1e-5)


def test_vocabulary_mismatch_and_bad_settings_are_refused(teacher_path, tmp_path):
    with pytest.raises(ValueError, match=r"vocabulary 256, this run's model.vocab_size=300"):
        make_trainer(student_args(teacher_path, 1, "model.vocab_size=300"), 1, 0, tmp_path)
    for cfg, message in ((DistillConfig(alpha=1.5), "distill.alpha=1.5"),
                         (DistillConfig(temperature=0.0), "distill.temperature=0.0")):
        with pytest.raises(ValueError, match=message):
            validate_distill_config(cfg)
