"""Decoder-only transformer LM with MoE feed-forward layers, Mixtral-compatible (same math and parameter shapes).

Shape legend: B batch, S sequence, D model width, H query heads, G key/value heads, Dh head width, V vocabulary.

Build on the meta device and materialise once (a large model never allocates twice):

    with torch.device("meta"):
        model = Transformer(model_cfg, moe_cfg)
    model.to_empty(device=device)
    model.init_weights()

No torch.distributed here: parallelism is applied from the outside (moe_train.parallel).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe_train.config.model import ModelConfig, validate_model_config
from moe_train.config.moe import MoEConfig
from moe_train.models.init import init_parameters
from moe_train.models.moe.experts import expert_param_ids
from moe_train.models.moe.layer import MoELayer
from moe_train.models.shard_spec import whole_specs


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, Dh] in float32, halves duplicated (the rotate-half convention of Llama/Mixtral in HF)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs_SF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat([freqs_SF, freqs_SF], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_BHSK: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]; math in float32."""
    x = x_BHSK.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos_SK + rotated * sin_SK).to(x_BHSK.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SK: torch.Tensor, sin_SK: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        # Head counts come from the projections' widths: under tensor parallelism each rank holds a slice of the
        # heads (same ratio n_heads / n_kv_heads), and this code does not need to know it.
        q = self.wq(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_SK, sin_SK), apply_rope(k, cos_SK, sin_SK)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """Dense SwiGLU FFN w2(silu(w1 x) * w3 x), used in the layers that are not MoE."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Module calls (not functional on .weight) so that tensor parallelism can wrap each projection.
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block; `moe` or `feed_forward` is set, never both. forward returns (x, aux_loss)."""

    def __init__(self, layer_id: int, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoELayer(cfg.d_model, moe_cfg) if cfg.is_moe_layer(layer_id) else None
        self.feed_forward = None if self.moe is not None else FeedForward(cfg.d_model, cfg.d_ff)

    def forward(self, x_BSD, cos_SK, sin_SK, task_ids_BS=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x_BSD = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SK, sin_SK)
        h_BSD = self.ffn_norm(x_BSD)
        if self.moe is None:
            return x_BSD + self.feed_forward(h_BSD), None
        out_BSD, aux_loss = self.moe(h_BSD, task_ids_BS)
        return x_BSD + out_BSD, aux_loss


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        validate_model_config(cfg, moe_cfg)
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(TransformerBlock(i, cfg, moe_cfg) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.build_rope(device=None)
        self.shard_specs = whole_specs(self, expert_param_ids(self))  # narrowed by apply_tp / apply_ep

    def build_rope(self, device) -> None:
        """RoPE tables as non-persistent buffers (recomputed, never checkpointed)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise every parameter (this process's region of it, per `shard_specs`) and buffer in place, after
        `to_empty` from the meta device; the values do not depend on the layout (models/init.py). seed None: one
        drawn from torch's global generator (a seeded program stays reproducible; two builds differ)."""
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, ()).item())
        init_parameters(self, self.shard_specs, self.cfg.init_std, seed)
        for moe in self.moe_layers():
            moe.router.init_buffers()  # the balancing bias starts at zero
        self.build_rope(self.tok_embeddings.weight.device)

    def moe_layers(self) -> Iterator[MoELayer]:
        return (layer.moe for layer in self.layers if layer.moe is not None)

    def forward(self, input_ids_BS: torch.Tensor, return_aux: bool = False, task_ids_BS: Optional[torch.Tensor] = None):
        """Logits [B, S, V]; with return_aux, (logits, aux_loss) where aux_loss sums the MoE layers' scaled
        load-balancing and z losses (a differentiable scalar to add to the LM loss). task_ids_BS: each token's task
        id, which task-routed MoE layers (moe.router_input) need; others ignore it."""
        S = input_ids_BS.shape[1]
        if S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x_BSD = self.tok_embeddings(input_ids_BS)
        cos_SK, sin_SK = self.rope_cos[:S], self.rope_sin[:S]
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x_BSD, layer_aux = layer(x_BSD, cos_SK, sin_SK, task_ids_BS)
            aux_loss = aux_loss + layer_aux if layer_aux is not None else aux_loss
        h_BSD = self.norm(x_BSD)
        logits = self.output(h_BSD) if self.output is not None else h_BSD @ self.tok_embeddings.weight.t()
        return (logits, aux_loss) if return_aux else logits


def build_model(cfg: ModelConfig, moe_cfg: MoEConfig, device: torch.device | str = "cpu",
                dtype: Optional[torch.dtype] = None, seed: Optional[int] = None,
                shard: Optional[Callable[[Transformer], None]] = None) -> Transformer:
    """Construct on the meta device, let `shard` cut it to this process's part (shapes only: parallelize), allocate
    that part once on `device` and initialise it (init_weights: the values do not depend on the layout). The
    router stays float32 under `dtype`."""
    with torch.device("meta"):
        model = Transformer(cfg, moe_cfg)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    model.init_weights(seed)
    if dtype is not None:
        model.to(dtype)
        for moe in model.moe_layers():
            moe.router.float()
    return model
