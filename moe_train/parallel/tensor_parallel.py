"""Megatron-style tensor parallelism with plain (local) tensors and two conjugate autograd operators.

    copy_to_tp:     forward identity,               backward all-reduce (sum) over tp   (Megatron's f)
    reduce_from_tp: forward all-reduce (sum) over tp, backward identity                (Megatron's g)

Attention: wq/wk/wv split by output rows (each rank keeps H/tp query heads and G/tp key/value heads, so the GQA
grouping stays local), wo split by input columns; input wrapped by copy_to_tp, output by reduce_from_tp. The dense
SwiGLU FFN the same way (w1, w3 column-parallel, w2 row-parallel). Experts are replicated across tp, or with
parallel.expert_tp split along their width F (w1/w3 rows, w2 columns) with the same two operators around them.
Norms, embeddings, the LM head and the router stay replicated; their gradients are identical on every tp rank
because copy_to_tp sums the partial input gradients. Every split is recorded in `model.shard_specs` ("tp").

Collectives: one all-reduce per wrapped module in forward (reduce_from_tp) and one in backward (copy_to_tp).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_train.parallel.sharding import shard_param


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # collective
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)  # collective
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def wrap_tp_region(module: nn.Module, group: dist.ProcessGroup) -> None:
    """copy_to_tp on the module's first input, reduce_from_tp on its output (forward hooks)."""
    def pre(mod, args):
        return (_CopyToTP.apply(args[0], group), *args[1:])

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (_ReduceFromTP.apply(out[0], group), *out[1:])
        return _ReduceFromTP.apply(out, group)

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def apply_tp(model: nn.Module, group: dist.ProcessGroup | None, tp_rank: int, tp: int, expert_tp: bool) -> None:
    """Split the layers' projections over tp (also on the meta device: sharded construction) and wrap them."""
    if tp == 1:
        return

    def split(prefix: str, plan: tuple[tuple[str, int], ...]) -> None:
        for name, dim in plan:
            if f"{prefix}.{name}" in model.shard_specs:  # w3 is absent for non-gated expert activations
                shard_param(model, f"{prefix}.{name}", dim, tp_rank, tp, "tp")

    for i, block in enumerate(model.layers):
        split(f"layers.{i}.attention", (("wq.weight", 0), ("wk.weight", 0), ("wv.weight", 0), ("wo.weight", 1)))
        wrap_tp_region(block.attention, group)
        if block.feed_forward is not None:
            split(f"layers.{i}.feed_forward", (("w1.weight", 0), ("w3.weight", 0), ("w2.weight", 1)))
            wrap_tp_region(block.feed_forward, group)
        elif expert_tp:
            split(f"layers.{i}.moe.experts", (("w1", 1), ("w3", 1), ("w2", 2)))
            wrap_tp_region(block.moe.experts, group)
