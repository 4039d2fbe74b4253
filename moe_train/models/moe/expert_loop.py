"""Routed expert MLPs computed expert by expert, with a hand-written backward (the CPU grouped GEMM).

Shape legend: R rows, D model width, F expert hidden width, E experts, n rows of one expert.

A group (e, start, n) is rows [start, start + n) of x_RD, run through expert e; an expert may have several groups
(expert parallelism: one capacity segment per source rank). Rows in no group (empty capacity slots) give zeros. Why not plain autograd over a Python loop:
  * `w[e]` indexing makes autograd zero-fill a full [E, F, D] gradient per expert and weight (measured: 40% of a
    step), and `torch.cat` of the outputs copies them once more; here every matmul writes into its slice of
    preallocated outputs (`torch.mm(..., out=)`), as a grouped GEMM kernel does;
  * the elementwise work stays per expert, on blocks that fit in cache;
  * only the two pre-activations h1, h3 are saved (the activation and its product are recomputed in backward), so
    the activation memory is below a dense FFN's of the same active width (which keeps four such tensors).
Group sizes are read on the host, which is free on CPU; accelerators use the sync-free grouped kernels instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_train.models.moe.activations import ACTIVATION_BACKWARD, ACTIVATION_FNS, activate

Groups = list[tuple[int, int, int]]  # (expert, start row, row count)


def _alloc(shape, like: torch.Tensor, filled: bool) -> torch.Tensor:
    """Uninitialised when every row will be written, zeros otherwise."""
    return torch.empty(shape, dtype=like.dtype, device=like.device) if filled else like.new_zeros(shape)


class _ExpertLoop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1_EFD, w2_EDF, w3_EFD: Optional[torch.Tensor], groups: Groups, activation: str,
                dropout: float = 0.0):
        """x: rows [R, D], or any [..., D] taken as its rows (the result has x's shape and is no view: FSDP2
        warns about modules that return views). dropout: probability of zeroing a hidden activation (training)."""
        x_RD = x.view(-1, x.shape[-1])
        filled = sum(n for _, _, n in groups) == x_RD.shape[0]
        y = _alloc(x.shape, x, filled)
        y_RD = y.view(x_RD.shape)
        hidden = []  # (h1, h3, dropout mask) of each non-empty group, in order
        for e, start, n in groups:
            if n == 0:
                continue
            x_nD = x_RD[start:start + n]
            h1_nF = x_nD @ w1_EFD[e].t()
            h3_nF = x_nD @ w3_EFD[e].t() if w3_EFD is not None else None
            a_nF = activate(h1_nF, h3_nF, activation)
            keep_nF = _keep_mask(a_nF, dropout)
            torch.mm(_drop(a_nF, keep_nF, dropout), w2_EDF[e].t(), out=y_RD[start:start + n])
            hidden += [h1_nF, h3_nF, keep_nF]
        # Everything through save_for_backward (not ctx attributes): activation checkpointing can then drop the
        # hidden activations and recompute them, and saved-tensor hooks see them.
        ctx.save_for_backward(x, w1_EFD, w2_EDF, w3_EFD, *hidden)
        ctx.groups, ctx.activation, ctx.filled, ctx.dropout = groups, activation, filled, dropout
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, w3, *hidden = ctx.saved_tensors
        triples = iter(zip(hidden[0::3], hidden[1::3], hidden[2::3]))
        x_RD, grad_RD = x.view(-1, x.shape[-1]), grad.reshape(-1, x.shape[-1])
        used = {e for e, _, n in ctx.groups if n > 0}
        grad_x_full = _alloc(x.shape, x, ctx.filled)
        grad_x = grad_x_full.view(x_RD.shape)
        grads_w = [_alloc(w.shape, w, len(used) == w1.shape[0]) if w is not None else None for w in (w1, w2, w3)]
        seen: set[int] = set()
        for e, start, n in ctx.groups:
            if n > 0:
                rows = slice(start, start + n)
                _expert_backward(e, grad_RD[rows], x_RD[rows], (w1, w2, w3), next(triples), ctx.activation,
                                 ctx.dropout, grad_x[rows], grads_w, accumulate=e in seen)
                seen.add(e)
        return grad_x_full, grads_w[0], grads_w[1], grads_w[2], None, None, None


def _keep_mask(a_nF: torch.Tensor, dropout: float) -> Optional[torch.Tensor]:
    """Bool mask of the kept hidden activations (1 byte per element, as F.dropout saves), or None when off."""
    return torch.empty_like(a_nF).bernoulli_(1.0 - dropout).bool() if dropout > 0 else None


def _drop(a_nF: torch.Tensor, keep_nF: Optional[torch.Tensor], dropout: float) -> torch.Tensor:
    """Inverted dropout: kept values scaled by 1 / (1 - p), as F.dropout."""
    return a_nF if keep_nF is None else a_nF * keep_nF * (1.0 / (1.0 - dropout))


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b for an expert's later groups."""
    if accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _expert_backward(e, gy_nD, x_nD, weights, hidden, activation, dropout, gx_nD, grads_w, accumulate: bool):
    """Backward of y = drop(act(x w1^T) [* (x w3^T)]) w2^T for one group of expert e, writing gx_nD and (adding
    to, when `accumulate`) grads_w[*][e]."""
    w1, w2, w3 = weights
    h1_nF, h3_nF, keep_nF = hidden
    act_nF = ACTIVATION_FNS[activation](h1_nF)
    a_nF = act_nF * h3_nF if h3_nF is not None else act_nF
    _mm_into(grads_w[1][e], gy_nD.t(), _drop(a_nF, keep_nF, dropout), accumulate)
    ga_nF = _drop(gy_nD @ w2[e], keep_nF, dropout)
    gh1_nF = ACTIVATION_BACKWARD[activation](ga_nF * h3_nF if h3_nF is not None else ga_nF, h1_nF)
    torch.mm(gh1_nF, w1[e], out=gx_nD)
    _mm_into(grads_w[0][e], gh1_nF.t(), x_nD, accumulate)
    if h3_nF is not None:
        gh3_nF = ga_nF * act_nF
        gx_nD.addmm_(gh3_nF, w3[e])
        _mm_into(grads_w[2][e], gh3_nF.t(), x_nD, accumulate)


def expert_loop(x_RD, w1_EFD, w2_EDF, w3_EFD, groups: Groups, activation: str, dropout: float = 0.0) -> torch.Tensor:
    """Rows of group e through expert e (SwiGLU when w3 is given, else act(x w1^T) w2^T); other rows are 0. x_RD
    may also be [..., D] (e.g. a capacity buffer), taken as its rows; the result has its shape. dropout: on the
    hidden activations (the caller passes 0 in eval mode).

    Under autocast the inputs are cast to the autocast dtype here, because the Function's `out=` matmuls bypass it."""
    device_type = x_RD.device.type
    if not torch.is_autocast_enabled(device_type):
        return _ExpertLoop.apply(x_RD.contiguous(), w1_EFD, w2_EDF, w3_EFD, groups, activation, dropout)
    dtype = torch.get_autocast_dtype(device_type)
    w1, w2, w3 = (None if w is None else w.to(dtype) for w in (w1_EFD, w2_EDF, w3_EFD))
    with torch.autocast(device_type, enabled=False):
        return _ExpertLoop.apply(x_RD.to(dtype).contiguous(), w1, w2, w3, groups, activation, dropout)
