"""Fine-tuning switches (config key `finetune`): which parameter groups stay frozen.

Sparse models overfit when fine-tuned; freezing the MoE layers (router and experts) loses little, freezing the
other weights hurts (ST-MoE, Zoph et al. 2022). Frozen parameters get no gradient, no optimizer state and no
gradient all-reduce, and stay bitwise unchanged (models/param_groups.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Every parameter belongs to exactly one group (models/param_groups.py decides which).
PARAM_GROUPS = ("router", "experts", "shared_experts", "attention", "dense_ffn", "embeddings", "norms", "lm_head")


@dataclass
class FinetuneConfig:
    freeze: list[str] = field(default_factory=list)
    """Parameter groups to freeze, among `router` (gate, noise weight), `experts` (routed experts' w1/w2/w3),
    `shared_experts`, `attention` (q/k/v/o), `dense_ffn` (the FFNs of non-MoE layers), `embeddings`, `norms`,
    `lm_head`. Typical: [router] (router freezing), [router, experts, shared_experts] (freeze the MoE layers),
    [] (full fine-tuning). With model.tie_embeddings the embedding is the LM head: freeze both or neither."""


def validate_finetune_config(cfg: FinetuneConfig, tie_embeddings: bool) -> None:
    unknown = [name for name in cfg.freeze if name not in PARAM_GROUPS]
    if unknown:
        raise ValueError(f"finetune.freeze={list(cfg.freeze)}: unknown group(s) {unknown}; allowed: "
                         f"{', '.join(PARAM_GROUPS)}")
    tied = {"embeddings", "lm_head"} & set(cfg.freeze)
    if tie_embeddings and len(tied) == 1:
        raise ValueError(f"finetune.freeze={list(cfg.freeze)} freezes {tied.pop()!r} only, but model.tie_embeddings="
                         f"true makes the embedding and the LM head one tensor: freeze both or neither")
