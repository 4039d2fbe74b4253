"""Parameter counts: total, and active per token (the experts a token is not routed to do not count).

Works on a meta-device model, so `moe-train-params model=mixtral_8x7b` allocates nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class ParamCounts:
    total: int
    active: int
    routed_experts: int  # parameters of all routed experts (the part that is sparse)
    embedding: int

    def describe(self) -> str:
        return (f"total parameters:  {self.total:,} ({self.total / 1e9:.2f}B)\n"
                f"active per token:  {self.active:,} ({self.active / 1e9:.2f}B)\n"
                f"routed experts:    {self.routed_experts:,}; embeddings and LM head: {self.embedding:,}")


def count_parameters(model: nn.Module) -> ParamCounts:
    """Unique parameters (a tied LM head counts once). Active = total - (E - k) / E of every MoE layer's routed
    experts, since each token runs k of the E experts; router, attention, norms, embeddings and shared experts are
    all active."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    routed, inactive = 0, 0
    for moe in model.moe_layers():
        n = sum(p.numel() for p in moe.experts.parameters())
        routed += n
        inactive += n * (moe.cfg.num_experts - moe.cfg.top_k) // moe.cfg.num_experts
    embedding = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("tok_embeddings", "output")))
    return ParamCounts(total, total - inactive, routed, embedding)


def flop_params(model: nn.Module) -> int:
    """Active parameters per token minus the input embedding table (a lookup, no matmul; a tied table counts once,
    as the LM head)."""
    table = model.tok_embeddings.weight.numel() if model.output is not None else 0
    return count_parameters(model).active - table


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs per token, forward and backward (PaLM, appendix B): 6 N + 12 L d_model seq_len, N =
    flop_params; the second term is attention's score and value matmuls, without a causal discount. Activation
    checkpointing's recomputation is not counted (model FLOPs, as MFU counts them)."""
    cfg = model.cfg
    return 6 * flop_params(model) + 12 * cfg.n_layers * cfg.d_model * seq_len
