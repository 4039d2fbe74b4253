"""torch.compile: the MoE layer's grouped paths compile to one graph (fullgraph=True: no graph break, so no host
sync) and equal eager; `train.compile=true` trains like eager and resumes from its checkpoints; compiled parameter
names are the eager ones."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from helpers import forward_backward, make_layer
from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.models.moe.dispatch import LocalDispatcher
from moe_train.training.trainer import Trainer, autocast_for
from multiproc import run_ranks
from test_train import SMALL


@pytest.mark.parametrize("capacity_factor", [1.25, -1.0], ids=["capacity", "dropless"])
def test_moe_layer_grouped_compiles_fullgraph_and_equals_eager(capacity_factor):
    """bf16 autocast, as on a GPU: the grouped kernels' compiled form needs bf16 (experts.grouped_mm_supported).
    fullgraph=True fails on any graph break, and every host sync (`.tolist()`, `.item()`, bincount's size) is one."""
    torch.manual_seed(0)
    layer = make_layer(d_model=32, num_experts=4, top_k=2, d_ff=48, capacity_factor=capacity_factor,
                       expert_impl="grouped")
    layer.dispatcher = LocalDispatcher(scatter_free=True)  # what runs on accelerators
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux, grad_x, grads = forward_backward(layer, x)
        compiled = torch.compile(layer, fullgraph=True)
        c_out, c_aux, c_grad_x, c_grads = forward_backward(compiled, x)
    assert torch.allclose(c_out, out, atol=1e-3) and torch.allclose(c_aux, aux, atol=1e-6)
    assert torch.allclose(c_grad_x, grad_x, atol=1e-3)
    for (name, g), c in zip(grads.items(), c_grads.values()):
        assert torch.allclose(c, g, atol=2e-3, rtol=1e-2), name




def test_compiles_of_other_capacity_factors_in_one_process_equal_eager():
    """`moe-train -m moe.capacity_factor=1.25,1.5 train.compile=true` runs its jobs in one process, so the second
    job compiles the same code with another capacity factor. torch.compile turns a float that changed between
    compiles symbolic, and capacity sizes derived from it failed inside the scatter-free gathers' autograd.Function
    (the accelerator path: CPU's index_select path has none). Each compile equals eager."""
    torch._dynamo.reset()  # the sequence below, not whatever earlier tests compiled
    for capacity_factor in (1.25, 1.5, -1.0, 1.25):
        torch.manual_seed(0)
        layer = make_layer(d_model=32, num_experts=4, top_k=2, d_ff=48, capacity_factor=capacity_factor,
                           expert_impl="grouped")
        layer.dispatcher = LocalDispatcher(scatter_free=True)
        x = torch.randn(64, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _, grad_x, _ = forward_backward(layer, x)
            c_out, _, c_grad_x, _ = forward_backward(torch.compile(layer, fullgraph=True), x)
        assert torch.allclose(c_out, out, atol=1e-3) and torch.allclose(c_grad_x, grad_x, atol=1e-3), capacity_factor
    torch._dynamo.reset()

def test_compiled_backward_runs_outside_autocast_as_eager():
    """The Trainer runs only the forward under autocast (`autocast_for`); eager's backward then computes the router's
    float32 GEMMs in float32. torch.compile traces a region's backward under the forward's autocast unless told not
    to (pytorch#153044): the router's weight gradient then came from bf16 GEMMs, 3e-3 away from eager's. Its relative
    error to eager must be float32 rounding, far below bf16's (2^-8)."""
    torch.manual_seed(0)
    layer = make_layer(d_model=64, num_experts=4, top_k=2, d_ff=64, capacity_factor=-1.0, expert_impl="grouped")
    layer.dispatcher = LocalDispatcher(scatter_free=True)
    x = torch.randn(256, 64)

    def router_grads(module):
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        with autocast_for(torch.device("cpu"), "bf16"):
            out, aux = module(x_in)
        (out.float().square().mean() + aux).backward()  # outside autocast, as Trainer.compute_gradients
        return layer.router.weight.grad.clone()

    eager = router_grads(layer)
    compiled = router_grads(torch.compile(layer, fullgraph=True))
    assert compiled.dtype == torch.float32
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-5

def losses_of(run_dir) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run(tmp_path, name, *overrides):
    cfg = compose_config([*SMALL, "train.log_every=1", "train.eval_every=0", *overrides])
    validate_config(cfg)
    trainer = Trainer(cfg, tmp_path / name)
    trainer.train()
    return trainer


def test_compiled_training_equals_eager(tmp_path):
    """Three steps with train.compile=true equal eager within float32 tolerance (fused kernels round differently);
    compiled parameter names are the eager ones (checkpoints are interchangeable)."""
    eager = run(tmp_path, "eager", "train.max_steps=3")
    compiled = run(tmp_path, "compiled", "train.max_steps=3", "train.compile=true")
    assert losses_of(tmp_path / "compiled") == pytest.approx(losses_of(tmp_path / "eager"), abs=2e-4)
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]


@pytest.mark.slow  # three compiled runs, ~80 s on 2 cores
def test_compiled_training_resumes_bit_for_bit(tmp_path):
    """A compiled run checkpointed at step 2 and resumed (compiled again) continues bit for bit as the
    uninterrupted compiled run."""
    run(tmp_path, "straight", "train.max_steps=4", "train.compile=true")
    run(tmp_path, "resumed", "train.max_steps=2", "train.compile=true", "checkpoint.every=2")
    run(tmp_path, "resumed", "train.max_steps=4", "train.compile=true", "checkpoint.every=2", "checkpoint.resume=auto")
    assert losses_of(tmp_path / "resumed") == losses_of(tmp_path / "straight")


def train_compiled(rank: int, world_size: int, args: list[str], run_dir: str) -> list[float]:
    from test_distributed_train import make_trainer

    torch.manual_seed(0)
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    trainer.train()
    return losses_of(pathlib.Path(run_dir)) if rank == 0 else []


@pytest.mark.slow  # two ranks compiling on 2 cores, ~70 s each
@pytest.mark.parametrize("engine", [(), ("fsdp.enabled=true", "train.activation_checkpointing=selective")],
                         ids=["plain", "fsdp_selective_ac"])
def test_compiled_expert_parallel_training_equals_eager_single_process(tmp_path, engine):
    """ep 2, dropless, train.compile=true: the all-to-all (and its host-read split sizes) runs eagerly between the
    compiled regions of each block; 5 steps equal the eager single-process run within float32 tolerance. Also with
    FSDP2 around the compiled blocks and the experts' forward checkpointed inside them."""
    from test_distributed_train import overrides

    reference = train_compiled(0, 1, overrides("dropless", 1), str(tmp_path / "eager"))
    args = overrides("dropless", 2, ("parallel.ep=2", "train.compile=true", *engine))
    compiled = run_ranks(2, train_compiled, args, str(tmp_path / "compiled"))[0]
    assert compiled == pytest.approx(reference, abs=2e-4)


def train_accelerator_path(rank: int, world_size: int, args: list[str], run_dir: str) -> list[float]:
    LocalDispatcher.use_scatter_free = lambda self, x: True  # in this spawned rank only: the gathers a GPU runs
    return train_compiled(rank, world_size, args, run_dir)


@pytest.mark.slow  # ~30 s per mode on 2 cores
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_compiled_expert_parallel_accelerator_path_equals_eager(tmp_path, mode):
    """What a GPU runs and CPU defaults skip: the scatter-free gathers (autograd.Functions inside the compiled
    regions), grouped experts, bf16 autocast; ep 2 compiled against eager on one process, 5 steps."""
    from test_distributed_train import overrides

    gpu_path = ("train.mixed_precision=bf16", "moe.expert_impl=grouped")
    reference = run_ranks(1, train_accelerator_path, overrides(mode, 1, gpu_path), str(tmp_path / "eager"))[0]
    args = overrides(mode, 2, (*gpu_path, "parallel.ep=2", "train.compile=true"))
    compiled = run_ranks(2, train_accelerator_path, args, str(tmp_path / "compiled"))[0]
    assert compiled == pytest.approx(reference, abs=1e-3)
