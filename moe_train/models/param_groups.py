"""Named parameter groups of the Transformer, for freezing during fine-tuning (`finetune.freeze`).

Every parameter belongs to exactly one group, decided by its name (names are stable: checkpoints and the HF
mapping use them too). Freezing sets requires_grad=False before the model is parallelised, so every engine sees
it: the optimizer gets no state for frozen parameters (training/optim.py skips them), gradient reduction and
clipping skip them (parallel/data_parallel.py), ZeRO and FSDP2 leave them out of their gradient buffers.
"""

from __future__ import annotations

import re

from torch import nn

from moe_train.config.finetune import PARAM_GROUPS

# (group, pattern on the parameter name); the first match wins.
GROUP_PATTERNS = (
    ("router", re.compile(r"\.moe\.router\.")),
    ("experts", re.compile(r"\.moe\.experts\.")),
    ("shared_experts", re.compile(r"\.moe\.shared_experts\.")),
    ("attention", re.compile(r"\.attention\.")),
    ("dense_ffn", re.compile(r"\.feed_forward\.")),
    ("norms", re.compile(r"(^|\.)(attention_norm|ffn_norm|norm)\.weight$")),
    ("embeddings", re.compile(r"^tok_embeddings\.")),
    ("lm_head", re.compile(r"^output\.")),
)
assert tuple(sorted(g for g, _ in GROUP_PATTERNS)) == tuple(sorted(PARAM_GROUPS))


def param_group(name: str) -> str:
    """The group of parameter `name` (as Transformer.named_parameters() spells it)."""
    for group, pattern in GROUP_PATTERNS:
        if pattern.search(name):
            return group
    raise AssertionError(f"parameter {name!r} is in no group of {PARAM_GROUPS}")


def freeze(model: nn.Module, groups: list[str]) -> list[str]:
    """requires_grad=False on every parameter of `groups` (validated names); returns the frozen names. A tied LM
    head is the embedding (config validation asks for both groups then)."""
    params = dict(model.named_parameters())
    frozen = [name for name in params if param_group(name) in groups]
    if groups and len(frozen) == len(params):
        raise ValueError(f"finetune.freeze={list(groups)} freezes every parameter of this model: nothing would "
                         f"train; leave at least one of its groups out")
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
