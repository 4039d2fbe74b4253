"""Row gathers for dispatch and combine whose backward is a gather as well (no scatter, no atomics).

Shape legend: N source rows, M gathered rows, D width, K rows per source row in the inverse map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatherRows(torch.autograd.Function):
    """out_M = x_N[index_M] whose backward is a gather as well: grad_x[n] = sum_k grad_out[inverse_KN[k, n]].

    torch's index_select backward is an index_add: on CUDA one atomic add per element (two passes of K * T * D
    atomics per MoE layer, forward and combine), with 16-bit rounding in arrival order. Every row of a dispatch plan
    has one source and every source K known rows (the plan's inverse maps), so both directions are plain gathers.
    `pad_x` / `pad_grad`: index_M may name row N, inverse_KN row M: a zero row appended (empty slot, dropped pair).
    """

    @staticmethod
    def forward(ctx, x_ND, index_M, inverse_KN, pad_x: bool, pad_grad: bool):
        ctx.save_for_backward(inverse_KN)
        ctx.pad_grad = pad_grad
        return (F.pad(x_ND, (0, 0, 0, 1)) if pad_x else x_ND).index_select(0, index_M)

    @staticmethod
    def backward(ctx, grad_MD):
        (inverse_KN,) = ctx.saved_tensors
        grad = F.pad(grad_MD, (0, 0, 0, 1)) if ctx.pad_grad else grad_MD
        grad_KND = grad.index_select(0, inverse_KN.reshape(-1)).view(*inverse_KN.shape, grad_MD.shape[-1])
        accumulate = torch.promote_types(grad_MD.dtype, torch.float32)  # float32 for 16-bit grads, else their own
        grad_ND = grad_KND[0] if inverse_KN.shape[0] == 1 else grad_KND.sum(0, dtype=accumulate)
        return grad_ND.to(grad_MD.dtype), None, None, None, None


def gather_rows(x_ND: torch.Tensor, index_M: torch.Tensor, inverse_KN: torch.Tensor, pad_x: bool = False,
                pad_grad: bool = False, scatter_free: bool = True) -> torch.Tensor:
    """x_ND[index_M] (row N: zeros when pad_x). scatter_free: the backward is _GatherRows' gather (accelerators);
    else torch's index_select, whose backward index_add is faster on CPU (measured: the gather backward cost the
    tiny preset's MoE layer ~5% there), where there are no atomics to avoid."""
    if scatter_free:
        return _GatherRows.apply(x_ND, index_M, inverse_KN, pad_x, pad_grad)
    return (F.pad(x_ND, (0, 0, 0, 1)) if pad_x else x_ND).index_select(0, index_M)
