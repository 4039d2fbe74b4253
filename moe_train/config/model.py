"""Shape of the decoder-only transformer (Mixtral-compatible). Schema of the Hydra group `model` (conf/model/*.yaml).

The MoE blocks' own settings (experts, top-k, expert width, capacity) live in `MoEConfig` (config key `moe`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_train.config.moe import MoEConfig


@dataclass
class ModelConfig:
    """Decoder-only LM: embedding, n_layers x (RMSNorm, GQA attention with RoPE, RMSNorm, FFN), RMSNorm, LM head."""

    vocab_size: int = 256
    """V: token vocabulary size. 256 for the byte tokenizer; Mixtral 32000. Must cover the tokenizer's vocabulary."""

    d_model: int = 256
    """D: residual stream width, in features. Tiny 256; Mixtral-8x7B 4096."""

    n_layers: int = 4
    """Transformer blocks. Tiny 4; Mixtral-8x7B 32."""

    n_heads: int = 8
    """Query heads; head width = d_model / n_heads (must divide). Mixtral-8x7B 32 (head width 128)."""

    n_kv_heads: int = 4
    """Key/value heads of grouped-query attention; must divide n_heads (= n_heads: multi-head; 1: multi-query).
    Mixtral-8x7B 8."""

    d_ff: int = 1024
    """Hidden width of the dense SwiGLU FFN used in the layers that are not MoE, in features. In a dense twin of an
    MoE model, top_k * moe.d_ff gives the same active parameters."""

    moe_every: int = 1
    """Layer i (0-based) has an MoE FFN iff moe_every > 0 and (i + 1) % moe_every == 0. 1 = every layer (Mixtral),
    2 = every other layer (Switch, GShard), 0 = a dense model."""

    max_seq_len: int = 256
    """Longest sequence the RoPE tables are built for, in tokens. Mixtral-8x7B 32768."""

    rope_theta: float = 10000.0
    """RoPE base frequency. Llama 10000; Mixtral-8x7B 1e6."""

    norm_eps: float = 1e-5
    """RMSNorm epsilon."""

    tie_embeddings: bool = False
    """Share the token embedding with the LM head (False in Mixtral)."""

    init_std: float = 0.02
    """Standard deviation of the normal init of every weight matrix (HF initializer_range)."""

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe_every > 0 and (layer_id + 1) % self.moe_every == 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _positive(cfg: ModelConfig, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"model.{name}={getattr(cfg, name)} must be >= 1")


def validate_model_config(cfg: ModelConfig, moe: MoEConfig) -> None:
    """Raise ValueError naming the first inconsistent field, its value and what is allowed."""
    _positive(cfg, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"))
    if cfg.d_model % cfg.n_heads:
        raise ValueError(f"model.n_heads={cfg.n_heads} must divide model.d_model={cfg.d_model}")
    if cfg.head_dim % 2:
        raise ValueError(f"head width model.d_model / model.n_heads = {cfg.head_dim} must be even for RoPE")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"model.n_kv_heads={cfg.n_kv_heads} must divide model.n_heads={cfg.n_heads}")
    if cfg.moe_every < 0:
        raise ValueError(f"model.moe_every={cfg.moe_every} must be >= 0 (0 = dense model)")
    if not (cfg.rope_theta > 0 and cfg.norm_eps > 0 and cfg.init_std > 0):
        raise ValueError(f"model.rope_theta={cfg.rope_theta}, model.norm_eps={cfg.norm_eps} and "
                         f"model.init_std={cfg.init_std} must all be > 0")
