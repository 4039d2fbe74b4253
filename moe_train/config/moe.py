"""Configuration of one MoE block (router, losses, capacity, experts).

`MoEConfig` is the schema of the Hydra config group `moe` (``conf/moe/*.yaml``). Each field documents its unit and
typical values. `validate_moe_config` is the boundary check: it raises `ValueError` naming the field, the value and
what is allowed, before any tensor is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

ROUTERS = ("topk", "noisy_topk", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")
AUX_LOSS_SCOPES = ("micro_batch", "sequence", "global_batch")
ACTIVATIONS = ("swiglu", "gelu", "relu")
SECOND_EXPERT_POLICIES = ("all", "sampling")
DROP_POLICIES = ("position", "probability")
AUX_LOSS_COUNTING = ("first", "all")
EXPERT_IMPLS = ("auto", "grouped", "loop")
ROUTER_INPUTS = ("token", "task", "token_and_task")
DROPLESS = -1.0  # the documented capacity-factor value that selects dropless routing


@dataclass
class MoEConfig:
    """One MoE feed-forward block. Presets: conf/moe/{mixtral,switch,gshard,noisy_topk}.yaml."""

    num_experts: int = 8
    """E: routed experts per MoE layer. Typical 8 (Mixtral), 64-128 (Switch-Base)."""

    top_k: int = 2
    """k: experts each token is sent to, 1 <= k <= num_experts. 1 = Switch, 2 = GShard/Mixtral."""

    d_ff: int = 1024
    """F: hidden width of one expert (per-expert FFN width), in features. Mixtral-8x7B: 14336."""

    activation: str = "swiglu"
    """Expert MLP: `swiglu` (Mixtral: w2(silu(w1 x) * w3 x)) or `gelu`/`relu` (Switch/GShard: w2(act(w1 x)))."""

    router: str = "topk"
    """Gating function. `topk`: softmax over the linear router logits, keep the k largest.
    `noisy_topk` (Shazeer et al. 2017): logits + N(0, 1) * softplus(x W_noise) with a trainable W_noise, training only.
    `expert_choice` (Zhou et al. 2022): in training each expert takes its C most probable tokens of the micro-batch
    (C from capacity_factor and top_k as below), so a token gets 0..E experts and every expert is full. Not causal:
    a token's experts depend on the other tokens of the batch, later ones included; in eval mode (validation,
    generation) the router falls back to causal token-choice top-k over the same scores (docs/ROUTING.md)."""

    score_func: str = "softmax"
    """Router scores from the logits. `softmax` over the experts (Mixtral, Switch). `sigmoid` per expert
    (DeepSeek-V3): the gates are the selected experts' sigmoid scores, normalised over them when renormalize=true;
    the load-balancing loss and router entropy use the scores normalised over all experts."""

    bias_update_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for *selection only* (the gates
    stay the unbiased scores), updated after every optimizer step by bias_e += rate * sign(mean load - load_e), the
    loads being the step's router choices summed over all data- and expert-parallel ranks (identical everywhere);
    checkpointed with the model. DeepSeek-V3: 1e-3 (usually with aux_loss_coef=0). 0 = off. Token-choice routers."""

    aux_loss_scope: str = "micro_batch"
    """Over which tokens the load-balancing loss counts f_e and averages P_e. `micro_batch`: this rank's
    micro-batch (Switch, GShard). `sequence`: per sequence, then averaged over the sequences (DeepSeek-V3's
    sequence-wise loss, Megatron `seq_aux_loss`). `global_batch`: f_e counted over the micro-batch of every data- and
    expert-parallel rank (one all-reduce of E + 1 numbers per MoE layer and micro-batch; Megatron `global_aux_loss`,
    which also averages over the step's micro-batches so far)."""

    renormalize: bool = True
    """Rescale the kept experts' probabilities to sum to 1 per token (Mixtral, GShard top-2). False keeps the raw
    softmax probability (Switch top-1). In capacity mode the sum is over the experts that survived dropping, as
    GShard, fairseq and DeepSpeed do."""

    second_expert_policy: str = "all"
    """`all`: every one of the k choices is dispatched. `sampling` (GShard, k=2 only): the second expert is kept with
    probability min(1, 2 * g2), g2 its weight renormalised over the top two; dropped ones take no capacity."""

    jitter_eps: float = 0.0
    """Switch router jitter: multiply the router input by U(1 - eps, 1 + eps) during training. Typical 0.01; 0 = off."""

    capacity_factor: float = 1.25
    """Training capacity factor cf: C = max(ceil(cf * tokens * k / E), min_capacity) slots per expert; overflowing
    token-expert pairs are dropped. Typical 1.0-2.0. -1 = dropless (every pair computed; variable-size groups)."""

    eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode (module.eval()); same meaning and -1 = dropless."""

    min_capacity: int = 4
    """Lower bound on C, in tokens per expert (DeepSpeed's default 4). 0 = no bound."""

    drop_policy: str = "position"
    """Which pairs survive when an expert overflows. `position`: all first choices before all second choices, earlier
    tokens first (GShard, DeepSpeed). `probability`: highest router probability first."""

    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss E * sum_e f_e * P_e. Typical 0.01 (Switch), 0.02 (Mixtral); 0 = off."""

    aux_loss_counting: str = "first"
    """How f_e is counted: `first` = fraction of tokens whose first choice is e (GShard, DeepSpeed; balanced value 1);
    `all` = fraction of tokens that chose e among their k (HF Mixtral's load_balancing_loss_func; balanced value k)."""

    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss mean_t(logsumexp(logits_t)^2) (ST-MoE). Typical 1e-3; 0 = off."""

    routed_scale: float = 1.0
    """Multiplier on the combined routed-expert output (DeepSeek-V2/V3's `routed_scaling_factor`). With renormalised
    top-k gates the routed output is a weighted *average* of k experts, so a top-k MoE of k*d_ff active width feeds
    the residual stream about 1/k as much as its dense twin; routed_scale = top_k restores the dense scale (see
    docs/BENCHMARKS.md, end-to-end). 1.0 = Mixtral (required for HF Mixtral parity); must be > 0."""

    num_shared_experts: int = 0
    """Always-active shared experts (DeepSeekMoE), run as one dense MLP of width num_shared_experts * d_ff and added to
    the routed output. 0 = none."""

    expert_dropout: float = 0.0
    """Dropout probability on the experts' hidden activations (act(w1 x) [* w3 x], before w2), routed and shared
    experts, training only. Switch Transformer fine-tuning raises it to 0.4 while the rest of the model keeps 0.1;
    0 = off (pre-training). 0 <= p < 1."""

    router_input: str = "token"
    """What the router sees. `token`: the token's hidden state (every other MoE). `task`: only a learned embedding of
    the token's task (Task-MoE, Kudugunta et al. 2021): every token of a task goes to the same top_k experts per
    layer, so the task's sub-network can be extracted for serving (moe-train-compress --task). `token_and_task`:
    hidden state + task embedding. Task ids come from the data: chat records' "task", or the embedded corpus's
    domains with data.task_of_domain=true."""

    num_tasks: int = 0
    """Rows of each router's task embedding (router_input task / token_and_task): at least the data's number of
    tasks (6 for data.task_of_domain; the distinct "task" values of chat data, 5 for the generated set). 0 with
    router_input=token."""

    expert_impl: str = "auto"
    """Expert computation. `grouped`: no host sync; a batched matmul over the whole [E, C, D] capacity buffer (empty
    slots included) or torch's grouped GEMM over the dropless groups. `loop`: one matmul chain per non-empty expert
    over its filled rows only (one host sync per layer to read the group sizes). `auto`: `grouped` on accelerators,
    `loop` on CPU, where a host sync costs nothing and skipping empty slots saves compute."""

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == DROPLESS


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"moe.{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def _check_capacity_factor(name: str, value: float) -> None:
    if value == DROPLESS:
        return
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"moe.{name}={value!r} must be a positive number, or {DROPLESS} for dropless routing")


def validate_moe_config(cfg: MoEConfig, d_model: Optional[int] = None) -> None:
    """Raise ValueError naming the first invalid field of `cfg`, its value and what is allowed."""
    if cfg.num_experts < 1:
        raise ValueError(f"moe.num_experts={cfg.num_experts} must be >= 1")
    if not 1 <= cfg.top_k <= cfg.num_experts:
        raise ValueError(f"moe.top_k={cfg.top_k} must be between 1 and moe.num_experts={cfg.num_experts}")
    if cfg.d_ff < 1:
        raise ValueError(f"moe.d_ff={cfg.d_ff} must be >= 1")
    if d_model is not None and d_model < 1:
        raise ValueError(f"d_model={d_model} must be >= 1")
    for name, allowed in (("activation", ACTIVATIONS), ("router", ROUTERS), ("drop_policy", DROP_POLICIES),
                          ("second_expert_policy", SECOND_EXPERT_POLICIES),
                          ("aux_loss_counting", AUX_LOSS_COUNTING), ("expert_impl", EXPERT_IMPLS),
                          ("score_func", SCORE_FUNCS), ("aux_loss_scope", AUX_LOSS_SCOPES)):
        _check_choice(name, getattr(cfg, name), allowed)
    if cfg.second_expert_policy == "sampling" and cfg.top_k != 2:
        raise ValueError(f"moe.second_expert_policy='sampling' needs moe.top_k=2, got moe.top_k={cfg.top_k}")
    _check_capacity_factor("capacity_factor", cfg.capacity_factor)
    _check_capacity_factor("eval_capacity_factor", cfg.eval_capacity_factor)
    for name in ("min_capacity", "num_shared_experts"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"moe.{name}={getattr(cfg, name)} must be >= 0")
    for name in ("jitter_eps", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"moe.{name}={value!r} must be a finite number >= 0")
    if not (math.isfinite(cfg.routed_scale) and cfg.routed_scale > 0):
        raise ValueError(f"moe.routed_scale={cfg.routed_scale!r} must be a finite number > 0 (1.0 = Mixtral)")
    if not 0 <= cfg.expert_dropout < 1:
        raise ValueError(f"moe.expert_dropout={cfg.expert_dropout!r} must be in [0, 1) (0 = off)")
    _check_choice("router_input", cfg.router_input, ROUTER_INPUTS)
    if (cfg.router_input == "token") != (cfg.num_tasks == 0) or cfg.num_tasks < 0:
        raise ValueError(f"moe.num_tasks={cfg.num_tasks} with moe.router_input={cfg.router_input!r}: task routing "
                         f"needs num_tasks >= 1 (the data's number of tasks), token routing num_tasks=0")
    if cfg.jitter_eps >= 1:
        raise ValueError(f"moe.jitter_eps={cfg.jitter_eps} must be < 1 (the input is scaled by U(1-eps, 1+eps))")
    _check_expert_choice(cfg)


def _check_expert_choice(cfg: MoEConfig) -> None:
    if cfg.router != "expert_choice":
        return
    if cfg.dropless:
        raise ValueError(f"moe.router='expert_choice' fills every expert's C = capacity_factor * top_k * tokens / "
                         f"num_experts slots; it needs a positive moe.capacity_factor, got {cfg.capacity_factor}")
    if cfg.second_expert_policy != "all" or cfg.bias_update_rate > 0:
        raise ValueError(f"moe.router='expert_choice' is balanced by construction: it takes neither "
                         f"moe.second_expert_policy={cfg.second_expert_policy!r} (use 'all') nor "
                         f"moe.bias_update_rate={cfg.bias_update_rate} (use 0)")
