"""Where a run's initial weights come from (config key `init`): a fresh initialisation, or weights read from a file,
optionally upcycled from a dense model into this run's MoE (moe_train/interop/initial.py, models/upcycle.py).

The key is `init.from`, as users type it; `from` is a Python keyword, so the dataclass field is added by name and
read through `InitConfig.path` (OmegaConf sets and reads it by name like any other field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional


@dataclass(repr=False, eq=False)  # the generated __repr__/__eq__ would spell `self.from`, which does not compile
class InitConfig:
    """Initial weights. Default: none (a fresh initialisation from train.seed)."""

    __annotations__ = {"from": Optional[str]}
    vars()["from"] = field(default=None, init=False)
    """Initial weights (a fresh optimizer and LR schedule): this project's `weights.safetensors` (with its `.json`
    beside it), a checkpoint directory (`step_XXXXXXXX`, weights only; or a `checkpoints/` directory: its newest
    complete checkpoint), or a Hugging Face directory (Mixtral; dense Llama or Mistral into a dense config). Tensor
    shapes must match this run's model. A checkpoint that `checkpoint.resume` finds takes precedence. None = fresh."""

    upcycle: bool = False
    """Sparse upcycling (Komatsuzaki et al. 2022): `init.from` is a dense model and this run an MoE; every expert of
    layer i starts as (a slice of) layer i's dense FFN, scaled so that the MoE computes the dense function at step 0
    (renormalised top-k routing, no token dropped). The router starts as the usual init."""

    upcycle_granularity: int = 1
    """g: experts of width F/g cut from the dense FFN of width F (NVIDIA's granular upcycling, arXiv 2410.07524);
    expert e holds slice e mod g, and the router rows of experts e = t*g .. t*g+g-1 start tied so that top-k picks
    whole groups. Needs source model.d_ff = g * moe.d_ff, num_experts and top_k multiples of g. 1 = whole copies."""

    upcycle_noise: float = 0.0
    """Relative standard deviation of Gaussian noise added to each expert copy (times the std of the copy) to break
    the symmetry between copies. Typical 0 (the router's init breaks it) to 0.01."""

    @property
    def path(self) -> Optional[str]:
        return getattr(self, "from")

    @path.setter
    def path(self, value: Optional[str]) -> None:
        setattr(self, "from", value)

    def __repr__(self) -> str:
        return "InitConfig(" + ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)) + ")"

    def __eq__(self, other: object) -> bool:
        return type(other) is InitConfig and all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self))


def init_config(path: Optional[str] = None, **values) -> InitConfig:
    """An InitConfig with `from` = path (the constructor cannot take a keyword-named argument)."""
    cfg = InitConfig(**values)
    cfg.path = path
    return cfg


def validate_init_config(cfg: InitConfig, moe_every: int, moe) -> None:
    """Raise ValueError naming the first invalid `init.*` value and what is allowed (files are checked when read)."""
    if cfg.path is not None and not str(cfg.path).strip():
        raise ValueError(f"init.from={cfg.path!r} must be a path (or null for a fresh initialisation)")
    if cfg.upcycle_granularity < 1:
        raise ValueError(f"init.upcycle_granularity={cfg.upcycle_granularity} must be >= 1 (1 = whole copies)")
    if not (math.isfinite(cfg.upcycle_noise) and cfg.upcycle_noise >= 0):
        raise ValueError(f"init.upcycle_noise={cfg.upcycle_noise!r} must be a finite number >= 0")
    if cfg.upcycle:
        validate_upcycle_target(cfg, moe_every, moe)


def validate_upcycle_target(cfg: InitConfig, moe_every: int, moe) -> None:
    """What the target MoE must be for a function-preserving upcycle."""
    g = cfg.upcycle_granularity
    problems = [
        (cfg.path is None, "init.from is null: upcycling needs a dense source model"),
        (moe_every == 0, "model.moe_every=0 is a dense model: upcycling needs an MoE config (moe_every >= 1)"),
        (moe.activation != "swiglu", f"moe.activation={moe.activation!r}: the dense FFN is SwiGLU, so are the "
                                     f"experts cut from it (allowed: 'swiglu')"),
        (moe.num_shared_experts != 0, f"moe.num_shared_experts={moe.num_shared_experts}: the shared experts would "
                                      f"add to the copied FFN (allowed: 0)"),
        (moe.num_experts % g != 0, f"moe.num_experts={moe.num_experts} is not a multiple of "
                                   f"init.upcycle_granularity={g}"),
        (moe.top_k % g != 0, f"moe.top_k={moe.top_k} is not a multiple of init.upcycle_granularity={g} (top-k must "
                             f"pick whole groups of the {g} slices to compute the dense FFN)"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"init.upcycle=true: {message}")
