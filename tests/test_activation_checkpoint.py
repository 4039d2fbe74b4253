"""train.activation_checkpointing (parallel/activation_checkpoint.py): the same losses and gradients as without it
(float32, within 1e-6), with random routing draws replayed, and less activation memory kept for backward."""

from __future__ import annotations

import pytest
import torch

from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from helpers import load_bench_script
from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides, train_layout

RANDOM_ROUTING = ("moe.router=noisy_topk", "moe.jitter_eps=0.01")  # draws that recomputation must replay


def run(mode: str, ac: str, tmp_path, extra=()) -> dict:
    torch.manual_seed(0)
    return train_layout(0, 1, overrides(mode, 1, (*RANDOM_ROUTING, f"train.activation_checkpointing={ac}", *extra)),
                        str(tmp_path / f"{mode}_{ac}"))


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
@pytest.mark.parametrize("ac", ["full", "selective"])
def test_checkpointing_changes_neither_losses_nor_gradients(tmp_path, mode, ac):
    ref, got = run(mode, "none", tmp_path), run(mode, ac, tmp_path)
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-6) and len(ref["losses"]) == 5
    assert ref["grads"].keys() == got["grads"].keys()
    for name, g in ref["grads"].items():
        assert torch.allclose(got["grads"][name], g, atol=1e-6, rtol=0), name


def saved_activation_bytes(ac: str, tmp_path) -> int:
    """Activation bytes autograd keeps for backward after one forward (what checkpointing saves)."""
    trainer = make_trainer(overrides("dropless", 1, (f"train.activation_checkpointing={ac}",)), 1, 0,
                           tmp_path / ac)
    return load_bench_script("activation_memory").saved_bytes(trainer)


def test_checkpointing_keeps_less_for_backward(tmp_path):
    none, selective, full = (saved_activation_bytes(ac, tmp_path) for ac in ("none", "selective", "full"))
    assert full < selective < none, (none, selective, full)
    assert full < 0.5 * none, (none, full)


@pytest.mark.parametrize("layout", [("parallel.ep=2",), ("parallel.ep=2", "fsdp.enabled=true")],
                         ids=["ep2", "fsdp_ep2"])
def test_ep2_full_recompute_runs_the_all_to_all_again_and_equals_one_process(tmp_path, layout):
    """Deterministic routing: with random draws, ranks draw from their own streams and no layout equals one process.
    Under FSDP2 the recomputation runs inside the block's unit, with its parameters gathered for backward."""
    args = (*layout, "train.activation_checkpointing=full")
    results = run_ranks(2, train_layout, overrides("dropless", 2, args), str(tmp_path / "ep2"))
    torch.manual_seed(0)
    ref = train_layout(0, 1, overrides("dropless", 1), str(tmp_path / "single"))
    assert results[0]["losses"] == pytest.approx(ref["losses"], abs=1e-5)
    for res in results:
        for name, g in ref["grads"].items():
            assert torch.allclose(res["grads"][name], g, atol=1e-6, rtol=1e-5), name


def test_unknown_mode_is_refused_with_the_choices():
    cfg = compose_config(["train.activation_checkpointing=some"])
    with pytest.raises(ValueError, match=r"train.activation_checkpointing='some'.*allowed: none, full, selective"):
        validate_config(cfg, world_size=1)
