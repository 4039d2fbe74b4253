"""CPU-side regression tests for the bugs the first H100 run found (issue 11), each of which every earlier CPU test
missed: mixing host and device tensors in the trainer, expert GEMMs left in float32 under bf16 autocast, float32
activations through the dispatcher, bincount's host sync on the routing path, the ZeRO grad norm on the CPU,
validation batches uneven over dp, `parallel.backend` ignored, batches from pageable memory, no fused AdamW, no TF32.
"""

from __future__ import annotations

import contextlib
import json
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from device_guard import DeviceMixError, HostTensorGuard
from moe_train.cli_config import compose_config
from moe_train.config import ModelConfig, MoEConfig, validate_config
from moe_train.config.optim import OptimConfig, validate_optim_config
from moe_train.data.device import DevicePrefetcher
from moe_train.data.loader import TokenLoader, ValidationBatches
from moe_train.models.moe import routing
from moe_train.models.moe import losses
from moe_train.models.transformer import build_model
from moe_train.training.optim import build_optimizer
from moe_train.training.trainer import Trainer, configure_device
from test_train import SMALL

GEMMS = {"mm", "bmm", "addmm", "_grouped_mm", "linear"}


# -- device mixing --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra", [["moe.capacity_factor=-1"], ["train.mixed_precision=bf16", "moe.capacity_factor=1.25"]])
def test_train_eval_and_logging_never_mix_host_and_device_tensors(tmp_path, extra):
    """The guard (tests/device_guard.py) turns a CPU run into a two-device run: `torch.tensor(...)` without
    `device=` in trainer code meets the model's tensors and raises, as it does on CUDA."""
    cfg = compose_config([*SMALL, "train.max_steps=4", "train.log_every=2", "train.eval_every=2", *extra])
    validate_config(cfg)
    trainer = Trainer(cfg, tmp_path)
    with HostTensorGuard():
        last = trainer.train()
    assert "val_loss" in last and last["step"] == 4


def test_guard_catches_a_host_tensor_stacked_with_a_device_tensor():
    """The guard itself: the evaluation bug, written in a moe_train-like frame, is caught."""
    import moe_train.training.trainer as trainer_module

    code = compile("torch.stack([x.sum(), torch.tensor(2.0)])", trainer_module.__file__, "eval")
    with HostTensorGuard(), pytest.raises(DeviceMixError, match="stack"):
        eval(code, {"torch": torch, "x": torch.ones(3)})
    with HostTensorGuard():  # with device= it is fine
        eval(compile("torch.stack([x.sum(), torch.tensor(2.0, device=x.device)])", trainer_module.__file__, "eval"),
             {"torch": torch, "x": torch.ones(3)})


def test_zero_grad_norm_lives_on_the_engine_device():
    """ZeRO 1-3 report the norm as a Python float: it must become a tensor on the engine's device (it was wrapped on
    the CPU and crashed the log stack on CUDA). The meta device stands in for CUDA."""
    from moe_train.parallel.zero import ZeroEngine

    zero = ZeroEngine.__new__(ZeroEngine)
    zero.engine = types.SimpleNamespace(step=lambda: None, get_global_grad_norm=lambda: 1.5,
                                        device=torch.device("meta"))
    assert zero.step(None).device.type == "meta"


# -- bf16 end to end ------------------------------------------------------------------------------------------------
class GemmRecorder(TorchDispatchMode):
    """Records (op, operand dtypes, operand shapes) of every GEMM at the dispatcher, i.e. after autocast's casts."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMMS or name.startswith("_scaled_dot_product"):
            ops = [a for a in args[:3] if isinstance(a, torch.Tensor) and a.is_floating_point()]
            self.calls.append((name, {t.dtype for t in ops}, [tuple(t.shape) for t in ops]))
        return func(*args, **(kwargs or {}))


NUM_EXPERTS = 6  # no other dimension of the model below has this size: it marks the router's GEMMs


def is_router_gemm(call) -> bool:
    """x W^T with the [E, D] router weight, or its backward: a 2-D GEMM with an operand of width or height E."""
    name, _, shapes = call
    return name in ("mm", "addmm", "linear") and any(NUM_EXPERTS in s for s in shapes)


@pytest.mark.parametrize("impl,capacity_factor", [("loop", 1.25), ("loop", -1.0), ("grouped", 1.25),
                                                  ("grouped", -1.0), ("auto", 1.25)])
def test_every_gemm_but_the_router_runs_in_bf16_under_autocast(impl, capacity_factor):
    """Attention, the dense FFN, the shared and routed experts (each implementation, capacity and dropless) and the LM
    head get bf16 operands in forward and backward; only the router stays float32 (by design)."""
    cfg = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, moe_every=2,
                      max_seq_len=16)
    moe = MoEConfig(num_experts=NUM_EXPERTS, top_k=2, d_ff=48, capacity_factor=capacity_factor,
                    expert_impl=impl, num_shared_experts=1)
    model = build_model(cfg, moe)
    recorder = GemmRecorder()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(torch.randint(0, 40, (2, 8)), return_aux=True)
        (logits.float().logsumexp(-1).mean() + aux).backward()
    not_bf16 = [c for c in recorder.calls if c[1] != {torch.bfloat16} and not is_router_gemm(c)]
    assert not not_bf16, not_bf16
    expert_gemms = [c for c in recorder.calls if any(48 in s for s in c[2]) and not is_router_gemm(c)]
    assert len(expert_gemms) >= 9  # 3 forward + 6 backward at least (routed; shared experts add more)
    assert any(c[0].startswith("_scaled_dot_product") for c in recorder.calls)


def test_dispatched_rows_and_expert_outputs_are_bf16_under_autocast():
    """What the dispatcher's communication steps receive (under expert parallelism: what the all-to-all sends) is
    bf16, half the bytes of the float32 RMSNorm output; the combine accumulates in float32 and returns x's dtype."""
    from helpers import make_layer

    for cf in (1.25, -1.0):
        layer = make_layer(d_model=16, capacity_factor=cf)
        seen = {}
        dispatcher = layer.dispatcher
        dispatcher.token_dispatch = lambda x, plan: seen.setdefault("dispatch", x.dtype) and x
        dispatcher.token_combine = lambda y, plan, batch: seen.setdefault("combine", y.dtype) and y
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = layer(torch.randn(10, 16))
        assert seen == {"dispatch": torch.bfloat16, "combine": torch.bfloat16}
        assert out.dtype == torch.float32


@pytest.mark.parametrize("capacity_factor", [0.5, 1.25, -1.0], ids=["dropping", "capacity", "dropless"])
def test_scatter_free_row_gathers_equal_index_select(capacity_factor):
    """The accelerator path's gathers (backward without atomic index_add) give the CPU path's outputs and gradients,
    with dropped pairs and empty capacity slots."""
    from helpers import forward_backward, make_layer
    from moe_train.models.moe.dispatch import LocalDispatcher

    torch.manual_seed(0)
    layer = make_layer(d_model=16, capacity_factor=capacity_factor, dtype=torch.float64)
    x, upstream = torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    results = []
    for scatter_free in (False, True):
        layer.dispatcher = LocalDispatcher(scatter_free=scatter_free)
        results.append(forward_backward(layer, x, upstream))
    (out, aux, gx, grads), (s_out, s_aux, s_gx, s_grads) = results
    assert torch.allclose(out, s_out, atol=1e-12) and torch.allclose(gx, s_gx, atol=1e-12)
    for name in grads:
        assert torch.allclose(grads[name], s_grads[name], atol=1e-12), name
    if capacity_factor == 0.5:
        assert layer.last_stats.drop_frac > 0


# -- no host sync on the routing path -------------------------------------------------------------------------------
def test_routing_and_aux_losses_count_without_bincount(monkeypatch):
    """torch.bincount syncs on CUDA (it reads the largest id to size its output); counting must not use it."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.bincount on the routing path")

    monkeypatch.setattr(torch, "bincount", refuse)
    ids_TK = torch.tensor([[0, 1], [1, 2], [1, 0]])
    probs_TK = torch.full((3, 2), 0.5)
    plan = routing.capacity_plan(ids_TK, probs_TK, None, 3, 2, "position", True)
    assert plan.counts_E.tolist() == [2, 2, 1]
    assert routing.dropless_plan(ids_TK, probs_TK, 3, True).counts_E.tolist() == [2, 3, 1]
    assert losses.expert_fractions(ids_TK, 3, "all").tolist() == pytest.approx([2 / 3, 1.0, 1 / 3])
    assert losses.expert_fractions(ids_TK, 3, "first").tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])


# -- evaluation batches, backend, data path, optimizer, TF32 ---------------------------------------------------------
@pytest.mark.parametrize("dp_size", [1, 2, 3, 4, 5])
def test_every_dp_rank_gets_the_same_number_of_validation_batches(dp_size):
    """A rank with a batch fewer waited forever in the all-to-all of the others' last batch."""
    tokens = torch.arange(40 * 9) % 256
    counts = [len(ValidationBatches(tokens, 8, 1, r, dp_size, max_batches=7)) for r in range(dp_size)]
    assert len(set(counts)) == 1 and counts[0] >= 1, counts


def test_parallel_backend_is_honoured_and_checked(monkeypatch):
    from moe_train.config.parallel import ParallelDims
    from moe_train.parallel import context

    seen = {}
    monkeypatch.setattr(context.dist, "init_process_group", lambda backend, **kw: seen.setdefault("backend", backend))
    monkeypatch.setattr(context, "build_mesh", lambda dims, device_type: None)
    env = context.LaunchEnv(rank=0, world_size=2, local_rank=0)
    context.init_parallel(env, ParallelDims(2, 1, 1), torch.device("cpu"), 10.0, "gloo")
    assert seen["backend"] == "gloo"
    assert context.backend_for(torch.device("cuda"), "auto") == "nccl"
    assert context.backend_for(torch.device("cuda"), "gloo") == "gloo"
    with pytest.raises(ValueError, match="parallel.backend='nccl' needs CUDA"):
        context.init_parallel(env, ParallelDims(2, 1, 1), torch.device("cpu"), 10.0, "nccl")


def test_prefetched_batches_and_loader_state_match_the_plain_loader():
    """One batch ahead, yet a checkpoint's loader state still points at the next step's batch."""
    tokens = torch.arange(5000) % 256

    def loader():
        return TokenLoader(tokens, 16, 2, seed=3)

    plain, ahead = loader(), DevicePrefetcher(loader(), torch.device("cpu"))
    for _ in range(5):
        assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), ahead.next_batch()))
    assert ahead.state_dict() == plain.state_dict()
    resumed = DevicePrefetcher(loader(), torch.device("cpu"))
    resumed.load_state_dict(json.loads(json.dumps(ahead.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(plain.next_batch(), resumed.next_batch()))


def test_fused_adamw_choice():
    model = torch.nn.Linear(4, 4)
    auto = OptimConfig()
    assert not build_optimizer(model, auto, torch.device("cpu")).defaults["fused"]
    assert build_optimizer(model, OptimConfig(fused="true"), torch.device("cpu")).defaults["fused"]
    assert not build_optimizer(model, OptimConfig(fused="false"), torch.device("cpu")).defaults["fused"]
    from moe_train.training.optim import use_fused

    assert use_fused(auto, torch.device("cuda")) and not use_fused(OptimConfig(fused="false"), torch.device("cuda"))
    with pytest.raises(ValueError, match="optim.fused='yes'"):
        validate_optim_config(OptimConfig(fused="yes"))


@contextlib.contextmanager
def restored_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_follows_train_tf32_on_cuda_only():
    with restored_tf32():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        configure_device(torch.device("cpu"), types.SimpleNamespace(tf32=True))
        assert not torch.backends.cuda.matmul.allow_tf32
        configure_device(torch.device("cuda"), types.SimpleNamespace(tf32=True))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_device(torch.device("cuda"), types.SimpleNamespace(tf32=False))
        assert not torch.backends.cuda.matmul.allow_tf32


def test_resumed_adamw_step_lives_where_torch_keeps_it():
    """A fused (or capturable) AdamW keeps `step` on the parameter's device; loading it onto the CPU crashed the
    first step after `checkpoint.resume` on CUDA ("state_steps is on cpu"). The meta device stands in for CUDA."""
    from moe_train.checkpoint.holders import TorchState

    fused, plain = (torch.nn.Parameter(torch.empty(3, device="meta")) for _ in range(2))
    optimizer = types.SimpleNamespace(state={}, param_groups=[{"params": [fused], "fused": True},
                                                              {"params": [plain], "fused": None}])
    holder = TorchState(optimizer)
    for p in (fused, plain):
        holder.load(p, {"exp_avg": torch.empty(3, device="meta")}, {"step": 7.0})
    assert optimizer.state[fused]["step"].device.type == "meta"
    assert optimizer.state[plain]["step"].device.type == "cpu"
