"""Sparse upcycling: the experts of an MoE layer cut from a trained dense SwiGLU FFN (Komatsuzaki et al. 2022;
granular upcycling, NVIDIA arXiv 2410.07524, Megatron-Core's upcycling_utils.py).

Shape legend: E experts, F dense FFN width, Fe = F / g expert width, D model width, g granularity.

With granularity g the dense FFN w2 (silu(w1 x) * w3 x) is the sum of g slices of its hidden width:
FFN(x) = sum_c w2[:, c] (silu(w1[c] x) * w3[c] x), c the rows (of w1, w3) / columns (of w2) c*Fe .. (c+1)*Fe. Expert
e holds slice e mod g. The router rows of experts t*g .. t*g + g - 1 (a "virtual group" holding every slice once)
start tied, so their logits are equal and top-k with k a multiple of g picks whole groups. Renormalised top-k then
gives each picked group weight q_t / sum q and each of its g experts 1/g of that, so

    MoE(x) = routed_scale * sum_t (q_t / sum q) * (1/g) * sum_c slice_c(x) * s = FFN(x)   for  s = g / routed_scale,

which is why every expert's w2 is scaled by s (and only w2: an expert is linear in w2, while silu is not homogeneous,
so scaling w1 and w3 as Megatron does with s^(1/3) would change the function). g = 1 is plain copying; its router
needs no tying. Equality holds for renormalised top-k without token dropping (dropless, or a capacity that
keeps every pair) and without router noise (noisy gating, jitter and second-expert sampling are training-only).

Expert values depend only on (dense tensor, expert id, seed): a rank holding experts [a, b) computes just those,
and upcycle noise draws from one generator per (seed, parameter, expert) like models/init.py, so any expert-parallel
layout starts from the same model.
"""

from __future__ import annotations

import torch

from moe_train.models.init import generator, normal, param_seed


def dense_slice(dense: torch.Tensor, which: str, chunk: int, g: int) -> torch.Tensor:
    """Slice `chunk` of g of a dense FFN weight: rows of w1 / w3 [F, D], columns of w2 [D, F]."""
    dim = 1 if which == "w2" else 0
    width = dense.shape[dim] // g
    return dense.narrow(dim, chunk * width, width)


def expert_weight(dense: torch.Tensor, which: str, expert: int, g: int, routed_scale: float, noise: float,
                  seed: int, name: str) -> torch.Tensor:
    """Expert `expert`'s w1 / w3 [Fe, D] or w2 [D, Fe], in float32 on dense's device, from the dense FFN weight.
    noise: relative std of the Gaussian noise added (times dense's std), drawn per (seed, name, expert)."""
    value = dense_slice(dense.float(), which, expert % g, g)
    if which == "w2":
        value = value * (g / routed_scale)
    else:
        value = value.clone()
    if noise > 0:
        gen = generator(value.device, param_seed(seed, f"{name}/upcycle_noise", expert))
        std = noise * float(value.std())  # host sync: one per expert tensor, at start-up only
        value += torch.empty_like(value).normal_(0.0, std, generator=gen)
    return value


def tied_router(shape: tuple[int, int], std: float, g: int, seed: int, name: str, device) -> torch.Tensor:
    """The router [E, D] as models/init.py initialises it, then rows t*g .. t*g + g - 1 all equal row t's init."""
    whole = torch.empty(shape, device=device)
    normal(std)(whole, generator(whole.device, param_seed(seed, name)))
    return whole[torch.arange(shape[0], device=device) // g]
