"""`apply_compile`: torch.compile each transformer block in place (torchtitan's per-block compile).

Per block rather than the whole model: identical blocks share one compiled graph (the parameters are graph inputs),
so compile time does not grow with depth, and the embedding, the LM head and the loss stay eager.
`nn.Module.compile` compiles in place, so parameter names (and checkpoints) are the same as in eager mode.

Graph breaks, by design:
  * expert parallelism: the dispatcher's communication steps (`token_dispatch` / `token_combine`: the count exchange,
    the all-to-all and, dropless, the split sizes read on the host) are excluded with `torch.compiler.disable`, so
    each block compiles as [attention, router, plan, local dispatch] -> all-to-all (eager) -> [experts, local combine
    steps] -> all-to-all (eager) -> [the rest of the block];
  * `moe.expert_impl=loop` (the CPU default under `auto`): the loop reads group sizes on the host, so it runs
    eagerly (`torch.compiler.disable`; compiled, every new list of group sizes would be a recompile).
The grouped paths on one rank compile to one graph per block with no host sync (tests/test_compile.py checks
`fullgraph=True`).
"""

from __future__ import annotations

from torch import nn


def apply_compile(model: nn.Module, enabled: bool) -> None:
    if not enabled:
        return
    for block in model.layers:
        block.compile(fullgraph=False)  # breaks only where documented above
