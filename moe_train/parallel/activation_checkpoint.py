"""`apply_ac`: activation checkpointing (`train.activation_checkpointing`), applied by `parallelize` after tensor and
expert parallelism and before torch.compile (torchtitan's order: the compiled block contains the checkpoint).

  * `full`: every transformer block keeps only its input; its whole forward runs again in backward. Largest saving
    (the block's activations, for all but the block being recomputed), costs one more forward of the model (about
    +33% FLOPs). Under expert parallelism the recomputation runs the block's all-to-alls again (counted in
    a2a_bytes_per_step), and dropless its count exchange.
  * `selective`: the feed-forward networks only (the routed experts, the shared experts and the dense FFN) keep
    their input and recompute their hidden activations. Those are the largest activations of an MoE block: per
    token the experts hold K copies of three F-wide hidden tensors (w1 x, w3 x and their product), against D-wide
    inputs and outputs everywhere else (K F / D = 4 in the tiny preset, 7 at the Mixtral shape). The
    recomputed region sits between dispatch and combine: no communication and no random draw is repeated, and the
    cost is one more forward of the FFN GEMMs. Attention (its SDPA kernel already keeps only its output and
    log-sum-exp), the router and the dispatch keep their activations.

Random draws (noisy gating, the sampled second expert, jitter) are replayed: torch.utils.checkpoint restores the RNG
state before recomputing, so losses and gradients equal those without checkpointing. Parameter names are unchanged
(the module's forward is wrapped in place, no wrapper module): checkpoints do not depend on the mode.
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

def checkpoint_forward(module: nn.Module) -> None:
    """Run `module.forward` under non-reentrant checkpointing: only its inputs are kept for backward."""
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_ac(model: nn.Module, mode: str) -> None:
    if mode == "none":
        return
    for block in model.layers:
        if mode == "full":
            checkpoint_forward(block)
            continue
        ffns = (block.feed_forward,) if block.moe is None else (block.moe.experts, block.moe.shared_experts)
        for ffn in (m for m in ffns if m is not None):
            checkpoint_forward(ffn)
