"""Expert activations shared by every expert implementation: SwiGLU (Mixtral) and GELU/ReLU MLPs (Switch/GShard).

Shape legend: N rows, D model width, F hidden width.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

ACTIVATION_FNS = {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}
# d act(h) / dh applied to an incoming gradient, for hand-written backwards.
ACTIVATION_BACKWARD = {
    "swiglu": lambda grad, h: torch.ops.aten.silu_backward(grad, h),
    "gelu": lambda grad, h: torch.ops.aten.gelu_backward(grad, h),
    "relu": lambda grad, h: torch.ops.aten.threshold_backward(grad, h, 0),
}

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_*I, w_*OI) -> x w^T


def activate(h1: torch.Tensor, h3: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """silu(h1) * h3 for SwiGLU (h3 = the up projection), act(h1) otherwise (h3 is None)."""
    a = ACTIVATION_FNS[activation](h1)
    return a * h3 if h3 is not None else a


def mlp(matmul: Matmul, x, w1, w2, w3: Optional[torch.Tensor], activation: str, dropout: float = 0.0) -> torch.Tensor:
    """w2(drop(act(w1 x) [* w3 x])) with any matmul that computes x w^T (plain, batched or grouped); dropout: the
    probability of zeroing a hidden activation (the caller passes 0 in eval mode)."""
    h3 = matmul(x, w3) if w3 is not None else None
    a = activate(matmul(x, w1), h3, activation)
    return matmul(F.dropout(a, dropout) if dropout > 0 else a, w2)


def linear(x_ND: torch.Tensor, w_FD: torch.Tensor) -> torch.Tensor:
    return x_ND @ w_FD.t()


def expert_mlp(x_ND: torch.Tensor, w1_FD, w2_DF, w3_FD: Optional[torch.Tensor], activation: str,
               dropout: float = 0.0) -> torch.Tensor:
    """One expert (or a dense FFN): SwiGLU w2(silu(w1 x) * w3 x) or w2(act(w1 x)), dropout on the hidden."""
    return mlp(linear, x_ND, w1_FD, w2_DF, w3_FD, activation, dropout)
