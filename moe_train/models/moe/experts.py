"""Routed experts with weights stacked per layer, and the plain per-expert loop kept as the test reference.

Shape legend: T tokens, D model width, F expert hidden width, E experts, C capacity, R grouped rows.
Weights: w1_EFD (gate / first projection), w3_EFD (up projection, SwiGLU only), w2_EDF (down projection); these are
Mixtral's w1/w3/w2 per expert.

Precision: weights are float32 masters; under autocast every implementation runs its GEMMs on operands cast to the
autocast dtype here (`compute_dtype`), because `torch._grouped_mm` and the loop's `out=` matmuls are not autocast
ops: without the cast a bf16 run silently computed its experts in float32 (3.4x slower on an H100).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from moe_train.models.moe.activations import expert_mlp, mlp
from moe_train.models.moe.expert_loop import expert_loop


def grouped_mm_supported(x: torch.Tensor, w_EFD: torch.Tensor) -> bool:
    """torch._grouped_mm: bfloat16 (its CUDA kernel; the meta kernel torch.compile traces with insists on it), or
    float32 in eager mode (a fallback: on CUDA slow, with a host sync per call); rows whose byte strides are
    multiples of 16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype != torch.bfloat16 and (x.dtype != torch.float32 or torch.compiler.is_compiling()):
        return False
    return all((n * x.element_size()) % 16 == 0 for n in w_EFD.shape[1:])


def has_values(t: torch.Tensor) -> bool:
    """False for meta and fake tensors (shapes without data: the memory planner and the dry run), whose group
    sizes cannot be read: the experts then take a static-shape path and the dispatcher assumes balanced routing.
    Under torch.compile the traced tensors are fake too, but the compiled code runs on real ones: True there."""
    return torch.compiler.is_compiling() or not (t.is_meta or is_fake(t))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs on `t` run in: autocast's when autocast is on for t's device type, else t's own."""
    device_type = t.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else t.dtype


def to_compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """`t` cast to compute_dtype(t) (no copy when it already is): what autocast does for the ops it covers."""
    return t.to(compute_dtype(t)) if t.is_floating_point() else t


Weights = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (w1_EFD, w2_EDF, w3_EFD or None)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, impl: str = "auto",
                 dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.impl = impl
        self.dropout = dropout  # on the hidden activations, training only (moe.expert_dropout)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w3 = nn.Parameter(torch.empty(num_experts, d_ff, d_model)) if activation == "swiglu" else None
        self.init_weights()

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def init_weights(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """[E, C, D] capacity buffer or [R, D] rows grouped by expert -> same shape.

        counts_E: dropless, [E] rows per expert; capacity, [E] filled slots [0, n_e) per expert, or [E, S] when the
        buffer holds S segments of C / S slots per expert (one per source rank under expert parallelism), each
        filled from its start."""
        x = to_compute_dtype(x)
        weights = tuple(None if w is None else w.to(x.dtype) for w in (self.w1, self.w2, self.w3))
        if not has_values(x):
            return self.forward_shapes_only(x, counts_E, weights)
        if not self.use_loop(x):
            return self.forward_batched(x, weights) if x.dim() == 3 else self.forward_grouped_mm(x, counts_E, weights)
        return self.forward_loop(x, counts_E, weights)

    @property
    def hidden_dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def use_loop(self, x: torch.Tensor) -> bool:
        """`auto`: sync-free kernels on accelerators; on CPU a loop over filled rows (host syncs cost nothing there,
        and skipping the empty capacity slots saves (cf - 1) / cf of the FLOPs). Grouped GEMM needs 16-byte strides."""
        if self.impl == "auto":
            return x.device.type == "cpu" or (x.dim() == 2 and not grouped_mm_supported(x, self.w1))
        return self.impl == "loop"

    def forward_batched(self, x_ECD: torch.Tensor, weights: Weights) -> torch.Tensor:
        """Batched matmul over the whole capacity buffer, empty slots included (static shapes, no host sync)."""
        return mlp(lambda x, w: torch.bmm(x, w.transpose(1, 2)), x_ECD, *weights, self.activation, self.hidden_dropout)

    def forward_grouped_mm(self, x_RD: torch.Tensor, counts_E: torch.Tensor, weights: Weights) -> torch.Tensor:
        """torch grouped GEMM over rows grouped by expert; group ends stay on the device (no host sync)."""
        if not grouped_mm_supported(x_RD, self.w1):
            raise ValueError(f"moe.expert_impl='grouped' needs bfloat16 (float32 only in eager mode) and widths whose "
                             f"byte size is a multiple of 16; got dtype={x_RD.dtype}, w1 shape={tuple(self.w1.shape)}, "
                             f"compiling={torch.compiler.is_compiling()}; use train.mixed_precision=bf16")
        offs_E = torch.cumsum(counts_E, dim=0, dtype=torch.int32)

        def grouped(x, w):
            return torch._grouped_mm(x, w.transpose(1, 2), offs=offs_E)

        return mlp(grouped, x_RD, *weights, self.activation, self.hidden_dropout)

    def forward_shapes_only(self, x: torch.Tensor, counts_E: torch.Tensor, weights: Weights) -> torch.Tensor:
        """Meta/fake tensors: the kernels a GPU runs where they take any dtype (batched, grouped GEMM in bf16), else
        the rows dealt evenly over the experts (balanced routing) through a batched GEMM: the same tensor sizes."""
        if x.dim() == 3:
            return self.forward_batched(x, weights)
        if x.dtype == torch.bfloat16 and grouped_mm_supported(x, self.w1):
            return self.forward_grouped_mm(x, counts_E, weights)
        rows, experts = x.shape[0], self.num_experts
        per_expert = -(-rows // experts)
        x_ECD = F.pad(x, (0, 0, 0, per_expert * experts - rows)).view(experts, per_expert, -1)
        # A fresh tensor, as a kernel returns (a view would trip FSDP2's hooks); the padded one is freed.
        return self.forward_batched(x_ECD, weights).reshape(-1, x.shape[-1])[:rows].clone()

    # Eager under torch.compile: the group sizes are read on the host and would specialise (recompile) the graph.
    @torch.compiler.disable
    def forward_loop(self, x: torch.Tensor, counts_E: torch.Tensor, weights: Weights) -> torch.Tensor:
        """One matmul chain per non-empty group over its filled rows only (capacity segments, or dropless groups)."""
        groups = capacity_groups(x.shape[1], counts_E) if x.dim() == 3 else dropless_groups(counts_E)
        return expert_loop(x, *weights, groups, self.activation, self.hidden_dropout)  # rows of x, in x's shape


def expert_param_ids(model: nn.Module) -> set[int]:
    """ids of the routed experts' stacked weights in `model` (sharded over ep, reduced over edp)."""
    return {id(p) for m in model.modules() if isinstance(m, GroupedExperts) for p in m.parameters()}


def capacity_groups(slots_per_expert: int, counts_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, filled rows) of every capacity segment; counts_E is [E] or [E, S] (S segments)."""
    counts_ES = counts_E.view(counts_E.shape[0], -1).tolist()  # host sync: the group sizes decide the slices
    segment = slots_per_expert // len(counts_ES[0])
    return [(e, e * slots_per_expert + s * segment, n) for e, row in enumerate(counts_ES) for s, n in enumerate(row)]


def dropless_groups(counts_E: torch.Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of contiguous groups of rows sorted by expert."""
    counts = counts_E.tolist()  # host sync: the group sizes decide the slices (free on CPU)
    starts = [0] + list(itertools.accumulate(counts))[:-1]
    return [(e, start, n) for e, (start, n) in enumerate(zip(starts, counts))]


def loop_reference(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                   experts: GroupedExperts) -> torch.Tensor:
    """Test oracle: for each expert, find its tokens with a mask and add weight * expert(x). No dispatch code."""
    out_TD = torch.zeros_like(x_TD)
    for e in range(experts.num_experts):
        token_N, choice_N = torch.nonzero(ids_TK == e, as_tuple=True)
        if token_N.numel() == 0:
            continue
        w3 = None if experts.w3 is None else experts.w3[e]
        y_ND = expert_mlp(x_TD[token_N], experts.w1[e], experts.w2[e], w3, experts.activation)
        out_TD = out_TD.index_add(0, token_N, y_ND * weights_TK[token_N, choice_N, None].to(y_ND.dtype))
    return out_TD
