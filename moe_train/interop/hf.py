"""Mixtral checkpoints (Hugging Face layout) <-> moe_train models, and our own single-file weights format.

Shape legend: E experts, F expert hidden width, D model width.

Why this exists: to start from a released Mixtral (fine-tuning, evaluation) and to hand a trained model to the HF
ecosystem (`transformers.MixtralForCausalLM.from_pretrained`). Our parameters are the same tensors as Mixtral's, only
named and grouped differently, so the conversion is renaming plus stacking experts; no permutation is needed (our RoPE
uses HF's rotate-half convention, so q/k rows copy as they are).

Two HF layouts are read:
  * hub (what `save_pretrained` writes, and every released checkpoint): one tensor per expert,
    `model.layers.{i}.block_sparse_moe.experts.{j}.w1/w2/w3.weight` [F, D] / [D, F] / [F, D] and
    `model.layers.{i}.block_sparse_moe.gate.weight` [E, D];
  * transformers-5 in memory (`MixtralForCausalLM.state_dict()`): experts fused per layer,
    `model.layers.{i}.mlp.experts.gate_up_proj` [E, 2F, D] (w1 rows first, then w3), `.down_proj` [E, D, F] and
    `model.layers.{i}.mlp.gate.weight`.
Only the hub layout is written.

Our weights format (the `moe-train-convert` CLI; a real checkpoint directory will replace it):
  * `NAME.safetensors`: `Transformer.state_dict()` as is (router float32, other tensors in the model dtype);
  * `NAME.json` beside it: {"format": "moe_train.weights", "version": 1, "model": {ModelConfig fields},
    "moe": {MoEConfig fields}}.

Loading never allocates a model twice: the model is built on the meta device, allocated once with `to_empty`, and
each tensor is read from safetensors and copied into its parameter before the next one is read.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_train.config.model import ModelConfig
from moe_train.config.moe import DROPLESS, MoEConfig
from moe_train.models.transformer import Transformer

# ---------------------------------------------------------------------------------------------------------------------
# Config mapping
# ---------------------------------------------------------------------------------------------------------------------

HF_DEFAULTS = {  # transformers' MixtralConfig defaults: a config.json without the key means this value to HF too
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
    "initializer_range": 0.02, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "num_experts_per_tok": 2,
    "num_local_experts": 8, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "hidden_act": "silu",
    "rope_theta": 1e6,
}
MODEL_KEYS = {  # ModelConfig field -> Mixtral config key
    "vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_ff": "intermediate_size",
    "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}
MOE_KEYS = {  # MoEConfig field -> Mixtral config key
    "num_experts": "num_local_experts", "top_k": "num_experts_per_tok", "d_ff": "intermediate_size",
    "aux_loss_coef": "router_aux_loss_coef", "jitter_eps": "router_jitter_noise",
}
MOE_FIXED = {  # what Mixtral does and has no key for: SwiGLU experts, softmax top-k renormalised, never drops tokens
    "activation": "swiglu", "router": "topk", "renormalize": True, "aux_loss_counting": "all",
    "capacity_factor": DROPLESS, "eval_capacity_factor": DROPLESS, "num_shared_experts": 0, "routed_scale": 1.0,
    "second_expert_policy": "all", "score_func": "softmax", "bias_update_rate": 0.0,
}
MIXTRAL_REQUIREMENTS = (  # (field, read it, the only value Mixtral can express, why)
    ("model.moe_every", lambda m, e: m.moe_every, 1, "Mixtral has an MoE feed-forward in every layer"),
    ("moe.activation", lambda m, e: e.activation, "swiglu", "Mixtral experts are SwiGLU (w1, w2, w3)"),
    ("moe.router", lambda m, e: e.router, "topk", "Mixtral's router is a plain linear gate (no noise weight) "
                                                   "with token-choice top-k (no expert choice)"),
    ("moe.score_func", lambda m, e: e.score_func, "softmax", "Mixtral gates with a softmax over the experts"),
    ("moe.bias_update_rate", lambda m, e: e.bias_update_rate, 0.0, "Mixtral selects experts by the router "
                                                                   "logits alone (no balancing bias)"),
    ("moe.renormalize", lambda m, e: e.renormalize, True, "Mixtral renormalises the top-k weights to sum to 1"),
    ("moe.num_shared_experts", lambda m, e: e.num_shared_experts, 0, "Mixtral has no shared experts"),
    ("moe.router_input", lambda m, e: e.router_input, "token", "Mixtral's router sees the token only (no task "
                                                                "embedding)"),
    ("moe.routed_scale", lambda m, e: e.routed_scale, 1.0,
     "Mixtral adds the gate-weighted expert sum unscaled; save_mixtral folds the scale into the experts' w2"),
)
HF_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN
_DENSE_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "initializer_range": 0.02, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
                   "rope_theta": 10000.0}
# model_type -> (name in messages, transformers' defaults for keys a config.json may omit: save_pretrained writes
# only the keys that differ from them). Llama and Mistral (dense) are read by interop/hf_dense.py.
HF_FAMILIES = {
    "mixtral": ("Mixtral", HF_DEFAULTS),
    "llama": ("Llama", {**_DENSE_DEFAULTS, "intermediate_size": 11008, "num_key_value_heads": None,
                        "max_position_embeddings": 2048}),
    "mistral": ("Mistral", {**_DENSE_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                            "max_position_embeddings": 4096 * 32}),
}


def hf_family(hf_config: dict, allowed: tuple[str, ...] = ("mixtral",)) -> tuple[str, dict]:
    """(display name, defaults) of the config's model_type; ValueError unless it is one of `allowed`."""
    model_type = hf_config.get("model_type")
    if model_type not in allowed or model_type not in HF_FAMILIES:
        raise ValueError(f"config model_type={model_type!r} is not supported here; allowed: "
                         f"{', '.join(map(repr, allowed))}")
    return HF_FAMILIES[model_type]


def _family(hf_config: dict) -> tuple[str, dict]:
    """(name, defaults) of the config's model_type; Mixtral's for others (config_from_hf checks the type first)."""
    return HF_FAMILIES.get(hf_config.get("model_type"), HF_FAMILIES["mixtral"])


def hf_value(hf_config: dict, key: str):
    name, defaults = _family(hf_config)
    value = hf_config.get(key, defaults.get(key))
    if key == "num_key_value_heads" and value is None:  # HF: None means multi-head attention
        return hf_value(hf_config, "num_attention_heads")
    if value is None:
        raise ValueError(f"{name} config key {key!r} is null; a value is required")
    return value


def _family_name(hf_config: dict) -> str:
    return _family(hf_config)[0]


def _rope_section(hf_config: dict) -> tuple[str, dict]:
    """The RoPE parameters dict: transformers 5 writes `rope_parameters`, some files carry them in `rope_scaling`."""
    for key in ("rope_parameters", "rope_scaling"):
        section = hf_config.get(key)
        if section is not None:
            if not isinstance(section, dict):
                raise ValueError(f"{_family_name(hf_config)} config key {key!r}={section!r} must be a dict or null")
            return key, section
    return "rope_parameters", {}


def rope_theta_from_hf(hf_config: dict) -> float:
    """The RoPE base, wherever it is stored; raise on any RoPE scaling, which our plain RoPE tables cannot apply."""
    key, section = _rope_section(hf_config)
    rope_type = section.get("rope_type", section.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"{_family_name(hf_config)} config {key}.rope_type={rope_type!r} is not supported; only "
                         f"'default' (unscaled RoPE) can be represented")
    thetas = {v for v in (section.get("rope_theta"), hf_config.get("rope_theta")) if v is not None}
    if len(thetas) > 1:
        raise ValueError(f"{_family_name(hf_config)} config has two different RoPE bases: {key}.rope_theta="
                         f"{section.get('rope_theta')!r} and rope_theta={hf_config.get('rope_theta')!r}")
    return float(thetas.pop()) if thetas else float(hf_value(hf_config, "rope_theta"))


def check_hf_config(hf_config: dict, allowed: tuple[str, ...] = ("mixtral",)) -> None:
    """Reject the settings our model would silently compute differently."""
    family, _ = hf_family(hf_config, allowed)
    act = hf_value(hf_config, "hidden_act")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{family} config hidden_act={act!r} is not supported; allowed: 'silu' (SwiGLU FFNs)")
    d_model, n_heads = hf_value(hf_config, "hidden_size"), hf_value(hf_config, "num_attention_heads")
    head_dim = hf_config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        raise ValueError(f"{family} config head_dim={head_dim} is not supported; our head width is always "
                         f"hidden_size / num_attention_heads = {d_model} / {n_heads}")
    # Our attention is full causal. A window >= the longest sequence never masks anything, so it is equivalent;
    # a shorter one changes the model (Mistral-7B style), and we raise rather than compute something else.
    window, max_len = hf_config.get("sliding_window"), hf_value(hf_config, "max_position_embeddings")
    if window is not None and window < max_len:
        raise ValueError(f"{family} config sliding_window={window} is not supported: our attention is full causal; "
                         f"allowed: null or >= max_position_embeddings={max_len}")


def config_from_hf(hf_config: dict) -> tuple[ModelConfig, MoEConfig]:
    """(ModelConfig, MoEConfig) of a Mixtral `config.json` dict; missing keys take transformers' Mixtral defaults.

    Dropped, as they do not change the computed function: token ids, use_cache, output_router_logits, dtype,
    attention_dropout (we have none). router_jitter_noise maps to moe.jitter_eps, which jitters the router input only
    (Switch), where HF also jitters the experts' input: both are training-only.
    """
    check_hf_config(hf_config)
    model = ModelConfig(**{ours: hf_value(hf_config, hf) for ours, hf in MODEL_KEYS.items()}, moe_every=1,
                        rope_theta=rope_theta_from_hf(hf_config))
    moe = MoEConfig(**{ours: hf_value(hf_config, hf) for ours, hf in MOE_KEYS.items()}, **MOE_FIXED)
    return model, moe


def check_mixtral_compatible(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
    """Raise ValueError naming the first setting a Mixtral checkpoint cannot hold.

    Routing-time policies that leave the weights' meaning intact are allowed and dropped (Mixtral is dropless and
    has no training-only knobs): capacity factors, second-expert sampling, z-loss, aux-loss counting.
    """
    for name, read, allowed, why in MIXTRAL_REQUIREMENTS:
        value = read(model_cfg, moe_cfg)
        if value != allowed:
            raise ValueError(f"{name}={value!r} cannot be expressed as Mixtral; allowed: {allowed!r} ({why})")


def config_to_hf(model_cfg: ModelConfig, moe_cfg: MoEConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The Mixtral `config.json` dict of our configs (inverse of config_from_hf).

    rope_theta is written both nested (transformers 5) and top level (transformers 4 reads only that one).
    """
    check_mixtral_compatible(model_cfg, moe_cfg)
    hf = {hf_key: getattr(model_cfg, ours) for ours, hf_key in MODEL_KEYS.items()}
    # intermediate_size is the experts' width: moe.d_ff overrides model.d_ff (unused when every layer is MoE).
    hf.update({hf_key: getattr(moe_cfg, ours) for ours, hf_key in MOE_KEYS.items()})
    hf.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu", sliding_window=None,
              head_dim=model_cfg.head_dim, rope_theta=model_cfg.rope_theta,
              rope_parameters={"rope_theta": model_cfg.rope_theta, "rope_type": "default"},
              dtype=str(dtype).removeprefix("torch."))
    return hf


# ---------------------------------------------------------------------------------------------------------------------
# State-dict mapping: one recipe per parameter of ours, saying which HF tensors make it
# ---------------------------------------------------------------------------------------------------------------------

GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}  # ours -> HF
LAYER_NAMES = {  # ours under layers.{i}. -> HF under model.layers.{i}.
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
}
HUB_MOE = {  # ours under layers.{i}.moe. -> hub key under model.layers.{i}.block_sparse_moe.; {j}: stacked experts
    "router.weight": "gate.weight", "experts.w1": "experts.{j}.w1.weight", "experts.w2": "experts.{j}.w2.weight",
    "experts.w3": "experts.{j}.w3.weight",
}
FUSED_MOE = {  # ours under layers.{i}.moe. -> (in-memory key under model.layers.{i}.mlp., half of dim 1 or None)
    "router.weight": ("gate.weight", None), "experts.w1": ("experts.gate_up_proj", 0),
    "experts.w3": ("experts.gate_up_proj", 1), "experts.w2": ("experts.down_proj", None),
}
IGNORED_HF_KEYS = (re.compile(r"\.rotary_emb\.inv_freq$"),)  # derived buffers some old checkpoints carry


def _copy_checked(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    """copy_ would broadcast a wrong-shaped tensor silently; a shape mismatch means a config/weights mismatch."""
    if tuple(source.shape) != tuple(target.shape):
        raise ValueError(f"{name} has shape {tuple(source.shape)}, the config expects {tuple(target.shape)}")
    target.copy_(source)


@dataclass(frozen=True)
class Rename:
    """Our tensor is one source tensor under another name."""

    key: str

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def fill(self, target: torch.Tensor, get: Callable[[str], torch.Tensor]) -> None:
        _copy_checked(target, get(self.key), self.key)

    def split(self, ours: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(self.key, ours)]


@dataclass(frozen=True)
class Stack:
    """Our [E, ...] tensor stacks one source tensor per expert; filled expert by expert (no stacked temporary)."""

    keys: tuple[str, ...]

    def fill(self, target: torch.Tensor, get: Callable[[str], torch.Tensor]) -> None:
        if target.shape[0] != len(self.keys):
            raise ValueError(f"{len(self.keys)} expert tensors for a parameter of {target.shape[0]} experts")
        for j, key in enumerate(self.keys):
            _copy_checked(target[j], get(key), key)

    def split(self, ours: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.keys, ours.unbind(0)))


@dataclass(frozen=True)
class FusedHalf:
    """Our w1 / w3 [E, F, D] is the first / second half of dim 1 of transformers-5's gate_up_proj [E, 2F, D]."""

    key: str
    half: int

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def fill(self, target: torch.Tensor, get: Callable[[str], torch.Tensor]) -> None:
        fused = get(self.key)
        if fused.dim() != 3 or fused.shape[1] % 2:
            raise ValueError(f"{self.key} has shape {tuple(fused.shape)}; expected [E, 2F, D]")
        _copy_checked(target, fused.chunk(2, dim=1)[self.half], self.key)


def _moe_recipes(i: int, num_experts: int, layout: str) -> dict:
    ours, hub, fused = f"layers.{i}.moe.", f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
    if layout == "fused":
        return {ours + k: Rename(fused + key) if half is None else FusedHalf(fused + key, half)
                for k, (key, half) in FUSED_MOE.items()}
    return {ours + k: Stack(tuple(hub + key.format(j=j) for j in range(num_experts))) if "{j}" in key
            else Rename(hub + key) for k, key in HUB_MOE.items()}


def hf_recipes(model_cfg: ModelConfig, layout: str = "hub", num_experts: int = 8) -> dict:
    """Our parameter name -> recipe (Rename / Stack / FusedHalf) for a Mixtral-shaped model in `layout`."""
    recipes = {ours: Rename(hf) for ours, hf in GLOBAL_NAMES.items()
               if not (ours == "output.weight" and model_cfg.tie_embeddings)}
    for i in range(model_cfg.n_layers):
        recipes.update({f"layers.{i}.{ours}": Rename(f"model.layers.{i}.{hf}") for ours, hf in LAYER_NAMES.items()})
        recipes.update(_moe_recipes(i, num_experts, layout))
    return recipes


def detect_layout(keys: Iterable[str]) -> str:
    """'fused' if any layer holds transformers-5 fused experts, else 'hub'."""
    return "fused" if any(k.endswith(".mlp.experts.gate_up_proj") for k in keys) else "hub"


def _few(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_keys(provided: Iterable[str], expected: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Strict key matching (as load_state_dict(strict=True)) but a ValueError that names a few offenders."""
    provided = {k for k in provided if not any(p.search(k) for p in IGNORED_HF_KEYS)} - set(optional)
    expected = set(expected)
    missing, unexpected = expected - provided, provided - expected
    if missing or unexpected:
        raise ValueError(f"state dict does not match the config: missing keys [{_few(missing)}]; "
                         f"unexpected keys [{_few(unexpected)}]")


def _source_keys(recipes: dict) -> list[str]:
    return [key for recipe in recipes.values() for key in recipe.keys]


def checked_recipes(keys: Iterable[str], model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict:
    """Recipes for the layout of `keys`, after checking the keys match it. An HF model with tied embeddings may
    still list lm_head.weight (the same tensor as the embedding); it is ignored."""
    check_mixtral_compatible(model_cfg, moe_cfg)
    keys = list(keys)
    recipes = hf_recipes(model_cfg, detect_layout(keys), moe_cfg.num_experts)
    check_keys(keys, _source_keys(recipes), optional=("lm_head.weight",) if model_cfg.tie_embeddings else ())
    return recipes


def meta_model(model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(model_cfg, moe_cfg)


def state_dict_from_hf(sd: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict:
    """Our state dict (new tensors, source dtypes) from an HF Mixtral state dict in the hub or fused layout."""
    recipes = checked_recipes(sd.keys(), model_cfg, moe_cfg)
    shapes = {k: v.shape for k, v in meta_model(model_cfg, moe_cfg).state_dict().items()}
    out = {}
    for ours, recipe in recipes.items():
        out[ours] = torch.empty(shapes[ours], dtype=sd[recipe.keys[0]].dtype, device=sd[recipe.keys[0]].device)
        recipe.fill(out[ours], sd.__getitem__)
    return out


def iter_hf_tensors(our_sd: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(hub key, tensor) pairs of our state dict; expert tensors are views into our stacked parameters."""
    check_mixtral_compatible(model_cfg, moe_cfg)
    recipes = hf_recipes(model_cfg, "hub", moe_cfg.num_experts)
    check_keys(our_sd.keys(), recipes.keys())
    for ours, recipe in recipes.items():
        yield from recipe.split(our_sd[ours])


def state_dict_to_hf(our_sd: dict, model_cfg: ModelConfig, moe_cfg: MoEConfig) -> dict:
    """The hub-layout Mixtral state dict (what save_pretrained writes) of our state dict; tensors are views."""
    return dict(iter_hf_tensors(our_sd, model_cfg, moe_cfg))


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
INDEX_NAME = "model.safetensors.index.json"
OUR_SHARD_NAMES = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
WEIGHTS_FORMAT = {"format": "moe_train.weights", "version": 1}


class SafetensorsReader:
    """Key -> tensor over one or several safetensors files, read one tensor at a time (no whole-file load)."""

    def __init__(self, files: list[Path], device: str = "cpu"):
        self._handles, self.file_of = [], {}
        for file in files:
            handle = self._open(file, device)
            self._handles.append(handle)
            for key in handle.keys():
                if key in self.file_of:
                    raise ValueError(f"tensor {key!r} is in both {self.file_of[key].name} and {file.name}")
                self.file_of[key] = handle

    @staticmethod
    def _open(file: Path, device: str):
        """safetensors raises its own error type on a missing or corrupt file; callers expect a ValueError."""
        try:
            return safe_open(str(file), framework="pt", device=device)
        except Exception as err:  # SafetensorError is not importable under a stable name
            raise ValueError(f"cannot read safetensors file {str(file)!r}: {err}") from err

    def keys(self) -> list[str]:
        return list(self.file_of)

    def get(self, key: str) -> torch.Tensor:
        return self.file_of[key].get_tensor(key)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self.file_of[key].get_slice(key).get_shape())

    def dtype_of(self, key: str) -> torch.dtype:
        name = self.file_of[key].get_slice(key).get_dtype()
        if name not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {key!r} is stored as {name}; pass dtype= explicitly "
                             f"(readable: {', '.join(SAFETENSORS_DTYPES)})")
        return SAFETENSORS_DTYPES[name]


def _safetensors_files(path: Path) -> list[Path]:
    """The shard files named by the index when there is one (it is authoritative), else every *.safetensors."""
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{str(index)!r} has no 'weight_map' dict")
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors file in {str(path)!r} (a Mixtral directory needs model.safetensors "
                         f"or shards with {INDEX_NAME})")
    return files


def read_hf_dir(path) -> tuple[dict, list[Path]]:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Mixtral checkpoint directory {str(path)!r} does not exist or is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"no config.json in {str(path)!r}")
    return json.loads(config_file.read_text()), _safetensors_files(path)


def empty_model(model_cfg: ModelConfig, moe_cfg: MoEConfig, device, dtype: torch.dtype) -> Transformer:
    """Allocated once on `device` in `dtype` (router float32, as build_model), weights uninitialised, RoPE built."""
    model = meta_model(model_cfg, moe_cfg).to(dtype)  # dtype change on meta: no memory
    for moe in model.moe_layers():
        moe.router.float()
    model.to_empty(device=device)
    model.build_rope(device)  # non-persistent buffers are not in any file
    return model


@torch.no_grad()
def fill_model(model: Transformer, recipes: dict, get: Callable[[str], torch.Tensor]) -> Transformer:
    """Copy every parameter from its source tensors, one at a time; returned in eval mode."""
    targets = model.state_dict()  # detached views of the parameters: copying into them fills the model
    check_keys(recipes.keys(), targets.keys())  # invariant for HF recipes; catches a stale sidecar config
    for ours, recipe in recipes.items():
        recipe.fill(targets[ours], get)
    return model.eval()


def load_dtype(dtype: Optional[torch.dtype], reader: SafetensorsReader, embedding_key: str) -> torch.dtype:
    """dtype=None keeps the stored precision, read from the embedding (the router may be stored in float32)."""
    if dtype is not None:
        return dtype
    if embedding_key not in reader.keys():
        raise ValueError(f"tensor {embedding_key!r} is missing")
    return reader.dtype_of(embedding_key)


def load_mixtral(path, device="cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    """Our Transformer from a Mixtral directory (config.json + model.safetensors or index + shards), eval mode."""
    hf_config, files = read_hf_dir(path)
    model_cfg, moe_cfg = config_from_hf(hf_config)
    reader = SafetensorsReader(files, device=str(torch.device(device)))
    recipes = checked_recipes(reader.keys(), model_cfg, moe_cfg)
    model = empty_model(model_cfg, moe_cfg, device, load_dtype(dtype, reader, "model.embed_tokens.weight"))
    return fill_model(model, recipes, reader.get)


def parse_size(size) -> int:
    """Bytes of an int or a string such as '5GB' (10^9, as transformers) or '500MiB' (2^20)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if isinstance(size, bool) or match is None or match.group(2).upper() not in units:
        raise ValueError(f"max_shard_size={size!r} is not a size; allowed: bytes as int, or e.g. '5GB', '500MiB'")
    value = int(float(match.group(1)) * units[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} must be at least 1 byte")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy shards in order; a tensor bigger than max_bytes gets a shard of its own (as transformers does)."""
    shards, current, used = [], [], 0
    for key, nbytes in sizes:
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(key)
        used += nbytes
    return shards + [current] if current else shards


def _remove_old_shards(path: Path) -> None:
    """A stale index or shard from an earlier save would be read instead of, or mixed with, the new files."""
    for file in path.iterdir():
        if OUR_SHARD_NAMES.match(file.name):
            file.unlink()


def _write_shards(path: Path, tensors: dict, max_bytes: int) -> None:
    shards = plan_shards([(k, t.numel() * t.element_size()) for k, t in tensors.items()], max_bytes)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{s + 1:05d}-of-{n:05d}.safetensors" for s in range(n)]
    for name, keys in zip(names, shards):
        # One shard's copies at a time: save_file needs contiguous tensors that share no storage (expert views do).
        save_file({k: tensors[k].detach().to("cpu", copy=True).contiguous() for k in keys}, str(path / name),
                  metadata={"format": "pt"})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: names[s] for s, ks in enumerate(shards)
                                                                   for k in ks}}
        (path / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def fold_routed_scale(state: dict, moe_cfg: MoEConfig) -> tuple[dict, MoEConfig]:
    """Mixtral has no routed scale, but an expert's output is linear in its down projection: scale * sum_i g_i
    E_i(x) = sum_i g_i E_i'(x) with w2' = scale * w2. The same function, as a Mixtral (one rounding per w2 entry)."""
    scale = moe_cfg.routed_scale
    if scale == 1.0:
        return state, moe_cfg
    folded = {k: (v * scale if k.endswith(".experts.w2") else v) for k, v in state.items()}
    return folded, replace(moe_cfg, routed_scale=1.0)


def save_mixtral(model: Transformer, path, max_shard_size="5GB") -> None:
    """Write `path`/config.json and hub-layout safetensors (one model.safetensors, or shards + index when larger
    than max_shard_size), loadable by transformers.MixtralForCausalLM.from_pretrained. The router is kept in float32
    (lossless; transformers casts it to its model dtype)."""
    max_bytes = parse_size(max_shard_size)
    state, moe_cfg = fold_routed_scale(model.state_dict(), model.moe_cfg)
    tensors = state_dict_to_hf(state, model.cfg, moe_cfg)
    hf_config = config_to_hf(model.cfg, moe_cfg, model.tok_embeddings.weight.dtype)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _remove_old_shards(path)
    _write_shards(path, tensors, max_bytes)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Our weights file (safetensors + sidecar JSON config)
# ---------------------------------------------------------------------------------------------------------------------


def _weights_paths(path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"weights file {str(path)!r} must end in .safetensors (its config goes to NAME.json)")
    return path, path.with_suffix(".json")


def dataclass_from_dict(cls, values: dict, where: str):
    """Unknown keys are a newer or foreign format: refuse instead of dropping settings silently."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} keys [{_few(unknown)}]")
    return cls(**values)


def save_weights(model: Transformer, path, state_dict: Optional[dict] = None, layout: Optional[dict] = None) -> None:
    """Write our state dict (or `state_dict`, e.g. with sharded experts gathered) to `path` (NAME.safetensors) and
    the configs to NAME.json; `layout` (the run's world_size, dp, ep, tp) lets moe-train-eval rebuild the run's
    validation micro-batches."""
    write_weights(path, model.cfg, model.moe_cfg, model.state_dict() if state_dict is None else state_dict,
                  {} if layout is None else {"layout": layout})


def write_weights(path, model_cfg: ModelConfig, moe_cfg: MoEConfig, state_dict: dict, extra: dict) -> None:
    """NAME.safetensors from `state_dict` and NAME.json with the configs plus `extra` keys (layout: the run's
    world_size, dp, ep, tp; run: the whole Config of the run, for moe-train-eval; provenance such as compression)."""
    weights, sidecar = _weights_paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    config = {**extra, **WEIGHTS_FORMAT, "model": asdict(model_cfg), "moe": asdict(moe_cfg)}
    sidecar.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})


def read_weights_sidecar(path) -> dict:
    """The sidecar NAME.json of a weights file NAME.safetensors, format checked."""
    _, sidecar = _weights_paths(path)
    if not sidecar.is_file():
        raise ValueError(f"weights config {str(sidecar)!r} does not exist")
    config = json.loads(sidecar.read_text())
    if {k: config.get(k) for k in WEIGHTS_FORMAT} != WEIGHTS_FORMAT:
        raise ValueError(f"{str(sidecar)!r} is not a moe_train weights config (expected {WEIGHTS_FORMAT})")
    return config


def read_weights_config(path) -> tuple[ModelConfig, MoEConfig]:
    """The (ModelConfig, MoEConfig) in the sidecar NAME.json of a weights file NAME.safetensors."""
    config, where = read_weights_sidecar(path), str(_weights_paths(path)[1])
    return (dataclass_from_dict(ModelConfig, config.get("model", {}), where),
            dataclass_from_dict(MoEConfig, config.get("moe", {}), where))


def weights_reader(path, device="cpu"):
    """A reader of weights file `path`; one with quantized experts (moe-train-eval --save-quantized) reads them
    dequantized to float32."""
    reader = SafetensorsReader([Path(path)], device=str(torch.device(device)))
    quantization = read_weights_sidecar(path).get("quantization")
    if quantization is None:
        return reader
    from moe_train.serving.quantize import DequantizingReader  # interop does not depend on serving otherwise

    return DequantizingReader(reader, quantization)


def load_weights(path, device="cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    """Our Transformer from a weights file written by save_weights, in eval mode (dtype=None: the stored one)."""
    weights, _ = _weights_paths(path)
    model_cfg, moe_cfg = read_weights_config(weights)
    if not weights.is_file():
        raise ValueError(f"weights file {str(weights)!r} does not exist")
    reader = weights_reader(weights, device)
    recipes = {key: Rename(key) for key in reader.keys()}
    model = empty_model(model_cfg, moe_cfg, device, load_dtype(dtype, reader, "tok_embeddings.weight"))
    return fill_model(model, recipes, reader.get)


def load_checkpoint_weights(directory, device="cpu", dtype: Optional[torch.dtype] = None) -> Transformer:
    """Our Transformer (eval mode) from a moe_train checkpoint directory of any layout: the manifest is verified and
    every parameter is assembled from its chunks (experts by global id, tensor-parallel pieces by offset)."""
    from moe_train.checkpoint.manager import verify
    from moe_train.checkpoint.storage import ChunkReader

    directory = Path(directory)
    manifest = verify(directory)
    config = manifest["config"]
    model_cfg = dataclass_from_dict(ModelConfig, config["model"], str(directory / "manifest.json"))
    moe_cfg = dataclass_from_dict(MoEConfig, config["moe"], str(directory / "manifest.json"))
    chunks = ChunkReader(directory, manifest["tensors"])
    params = [k[len("model/"):] for k in manifest["tensors"] if k.startswith("model/")]
    model = empty_model(model_cfg, moe_cfg, device, dtype or chunks.dtype_of("model/tok_embeddings.weight"))
    return fill_model(model, {name: Rename(name) for name in params},
                      lambda key: chunks.read_full(f"model/{key}").to(device))
