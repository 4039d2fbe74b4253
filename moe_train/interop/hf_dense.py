"""Dense Hugging Face checkpoints (Llama, Mistral) -> our Transformer with a dense config (model.moe_every=0).

A Llama/Mistral decoder is our dense model: same pre-norm blocks, GQA attention with rotate-half RoPE, SwiGLU FFN
down(silu(gate x) * up x) = our w2(silu(w1 x) * w3 x). Attention and norm tensors are named as in Mixtral
(interop/hf.py), the FFN is `mlp.gate_proj / up_proj / down_proj`. What we cannot compute is refused with the key:
attention or MLP biases, RoPE scaling, a sliding window shorter than the context, a head width other than
hidden_size / heads. Use it to evaluate or fine-tune a dense model, or as the source of sparse upcycling
(`init.upcycle=true`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from moe_train.config.model import ModelConfig
from moe_train.config.moe import MoEConfig
from moe_train.interop import hf
from moe_train.interop.hf import GLOBAL_NAMES, LAYER_NAMES, MODEL_KEYS, Rename

DENSE_TYPES = ("llama", "mistral")
DENSE_FFN = {"feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
             "feed_forward.w2.weight": "mlp.down_proj.weight"}  # ours under layers.{i}. -> HF under model.layers.{i}.
BIAS_KEYS = ("attention_bias", "mlp_bias")


def dense_config_from_hf(hf_config: dict) -> tuple[ModelConfig, MoEConfig]:
    """(ModelConfig with moe_every=0, default MoEConfig) of a Llama or Mistral `config.json` dict."""
    hf.check_hf_config(hf_config, DENSE_TYPES)
    family, _ = hf.hf_family(hf_config, DENSE_TYPES)
    for key in BIAS_KEYS:
        if hf_config.get(key):
            raise ValueError(f"{family} config {key}={hf_config[key]!r} is not supported: our projections have no "
                             f"bias; allowed: false")
    model = ModelConfig(**{ours: hf.hf_value(hf_config, key) for ours, key in MODEL_KEYS.items()}, moe_every=0,
                        rope_theta=hf.rope_theta_from_hf(hf_config))
    return model, MoEConfig()


def dense_recipes(model_cfg: ModelConfig) -> dict:
    """Our parameter name -> recipe for a dense (Llama-shaped) model."""
    recipes = {ours: Rename(key) for ours, key in GLOBAL_NAMES.items()
               if not (ours == "output.weight" and model_cfg.tie_embeddings)}
    for i in range(model_cfg.n_layers):
        for ours, key in {**LAYER_NAMES, **DENSE_FFN}.items():
            recipes[f"layers.{i}.{ours}"] = Rename(f"model.layers.{i}.{key}")
    return recipes


def checked_dense_recipes(keys, model_cfg: ModelConfig) -> dict:
    recipes = dense_recipes(model_cfg)
    hf.check_keys(keys, [key for recipe in recipes.values() for key in recipe.keys],
                  optional=("lm_head.weight",) if model_cfg.tie_embeddings else ())
    return recipes


def hf_layout(hf_config: dict, keys, where) -> tuple[ModelConfig, MoEConfig, dict]:
    """(ModelConfig, MoEConfig, recipes by our parameter name) of any supported HF checkpoint: Mixtral, or dense
    Llama / Mistral; `keys` are its tensor names (checked), `where` names its config.json in errors."""
    model_type = hf_config.get("model_type")
    if model_type in DENSE_TYPES:
        model_cfg, moe_cfg = dense_config_from_hf(hf_config)
        return model_cfg, moe_cfg, checked_dense_recipes(keys, model_cfg)
    if model_type == "mixtral":
        model_cfg, moe_cfg = hf.config_from_hf(hf_config)
        return model_cfg, moe_cfg, hf.checked_recipes(keys, model_cfg, moe_cfg)
    raise ValueError(f"{str(where)!r}: model_type={model_type!r} is not supported; allowed: 'mixtral', "
                     f"{', '.join(map(repr, DENSE_TYPES))}")


def load_hf(path, device="cpu", dtype: Optional[torch.dtype] = None):
    """Our Transformer (eval mode) from any supported HF directory: Mixtral, or dense Llama / Mistral."""
    hf_config, files = hf.read_hf_dir(path)
    reader = hf.SafetensorsReader(files, device=str(torch.device(device)))
    model_cfg, moe_cfg, recipes = hf_layout(hf_config, reader.keys(), Path(path) / "config.json")
    model = hf.empty_model(model_cfg, moe_cfg, device, hf.load_dtype(dtype, reader, "model.embed_tokens.weight"))
    return hf.fill_model(model, recipes, reader.get)
