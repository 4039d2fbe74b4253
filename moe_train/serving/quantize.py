"""Weight-only quantized experts for evaluation and export: int8 per output channel, int4 per group of input columns.

Shape legend: E experts, O output features, I input features (of one expert projection: w1/w3 [F, D], w2 [D, F]),
G groups of input columns per row, R rows (tokens routed to one expert).

- int8: symmetric per output channel: w = q * scale_O, q in [-127, 127], scale = max|w_row| / 127.
- int4: asymmetric per group of `group_size` input columns: w = (q - 8) * scale_OG + zero_OG, q in [0, 15],
  scale = (max - min) / 15, zero = min + 8 * scale (the "tinygemm" convention).

Kernels: on CPU with 16-bit activations (train.mixed_precision=bf16) the GEMMs run in PyTorch's own weight-only
kernels, `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (the ones torchao's CPU int8 / int4
weight-only paths dispatch to). torchao's `quantize_` is not used: it swaps `nn.Linear` modules, and our experts are
stacked [E, O, I] parameters. Otherwise (float32 activations, other devices) each expert's weights are dequantized
to the activations' dtype before a plain GEMM: correct, the memory at rest is the quantized one, but no faster.

The routed rows are split per expert with one host sync (the group sizes) per layer and forward, as in the loop
implementation; an evaluation path, not a training one. Activations keep the compute dtype (bf16 under autocast).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe_train.models.moe.activations import mlp
from moe_train.models.moe.experts import GroupedExperts, capacity_groups, dropless_groups, to_compute_dtype
from moe_train.serving.calibrate import moe_layers

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernel supports


def check_quantization(mode: str, group_size: int) -> None:
    if mode not in MODES:
        raise ValueError(f"--quantize-experts {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {group_size}: int4 groups must be one of {INT4_GROUP_SIZES}")


def use_kernel(x: torch.Tensor) -> bool:
    """The CPU weight-only kernels for 16-bit activations; with float32 ones they are 30-70x slower than a float32
    GEMM on the dequantized weight (measured, docs/SERVING.md), so float32 dequantizes."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


class Int8Weight:
    """One [O, I] weight as int8 codes and a float32 scale per output row."""

    def __init__(self, w_OI: torch.Tensor):
        scale_O = w_OI.detach().float().abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.q_OI = torch.round(w_OI.detach().float() / scale_O[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale_O = scale_O

    @classmethod
    def from_stored(cls, q_OI: torch.Tensor, scale_O: torch.Tensor) -> "Int8Weight":
        weight = cls.__new__(cls)
        weight.q_OI, weight.scale_O = q_OI, scale_O.float()
        return weight

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_OI, self.scale_O

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q_OI.float() * self.scale_O[:, None]).to(dtype)

    def matmul(self, x_RI: torch.Tensor) -> torch.Tensor:
        if use_kernel(x_RI):
            return torch.ops.aten._weight_int8pack_mm(x_RI, self.q_OI, self.scale_O.to(x_RI.dtype))
        return x_RI @ self.dequantize(x_RI.dtype).t()

    def nbytes(self) -> int:
        return self.q_OI.numel() + 4 * self.scale_O.numel()


class Int4Weight:
    """One [O, I] weight as 4-bit codes (two per byte) and a float32 (scale, zero) per group of input columns."""

    def __init__(self, w_OI: torch.Tensor, group_size: int):
        out_features, in_features = w_OI.shape
        if in_features % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide the expert input width {in_features}")
        w_OGS = w_OI.detach().float().view(out_features, in_features // group_size, group_size)
        low_OG, high_OG = w_OGS.amin(-1), w_OGS.amax(-1)
        scale_OG = ((high_OG - low_OG) / 15.0).clamp_min(1e-12)
        q_OGS = torch.round((w_OGS - low_OG[..., None]) / scale_OG[..., None]).clamp(0, 15)
        self.group_size, self.shape = group_size, (out_features, in_features)
        self.packed = pack_int4(q_OGS.reshape(out_features, in_features).to(torch.uint8))
        self.scale_zero_GO2 = torch.stack([scale_OG, low_OG + 8.0 * scale_OG], dim=-1).transpose(0, 1).contiguous()
        self.tiles = None  # the CPU kernel's packed layout, made at the first CPU matmul

    @classmethod
    def from_stored(cls, packed: torch.Tensor, scale_zero_GO2: torch.Tensor, in_features: int) -> "Int4Weight":
        weight = cls.__new__(cls)
        weight.group_size, weight.shape = in_features // scale_zero_GO2.shape[0], (packed.shape[0], in_features)
        weight.packed, weight.scale_zero_GO2, weight.tiles = packed, scale_zero_GO2.float(), None
        return weight

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.packed, self.scale_zero_GO2

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        o, i = self.shape
        scale_OG, zero_OG = self.scale_zero_GO2.transpose(0, 1).unbind(-1)
        q_OGS = self.codes().float().view(o, i // self.group_size, -1)
        return ((q_OGS - 8.0) * scale_OG[..., None] + zero_OG[..., None]).reshape(o, i).to(dtype)

    def matmul(self, x_RI: torch.Tensor) -> torch.Tensor:
        if not use_kernel(x_RI):
            return x_RI @ self.dequantize(x_RI.dtype).t()
        if self.tiles is None:
            self.tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32), 1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_RI, self.tiles, self.group_size,
                                                           self.scale_zero_GO2.to(x_RI.dtype))

    def nbytes(self) -> int:
        return self.packed.numel() + 4 * self.scale_zero_GO2.numel()


def pack_int4(q_OI: torch.Tensor) -> torch.Tensor:
    """[O, I] uint8 codes in [0, 15] -> [O, ceil(I / 2)] bytes, even column in the low nibble."""
    if q_OI.shape[1] % 2:
        q_OI = torch.nn.functional.pad(q_OI, (0, 1))
    return q_OI[:, 0::2] | (q_OI[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def quantize_weight(w_OI: torch.Tensor, mode: str, group_size: int):
    return Int8Weight(w_OI) if mode == "int8" else Int4Weight(w_OI, group_size)


class QuantizedExperts(nn.Module):
    """GroupedExperts' forward contract ([E, C, D] capacity buffer or [R, D] grouped rows -> same shape) over
    quantized weights; evaluation only (no gradients)."""

    def __init__(self, experts: GroupedExperts, mode: str, group_size: int = 32):
        super().__init__()
        check_quantization(mode, group_size)
        self.mode, self.activation = mode, experts.activation
        self.w1, self.w2, self.w3 = (None if w_EOI is None else [quantize_weight(w, mode, group_size) for w in w_EOI]
                                     for w_EOI in (experts.w1, experts.w2, experts.w3))

    @property
    def num_experts(self) -> int:
        return len(self.w1)

    def nbytes(self) -> int:
        return sum(w.nbytes() for ws in (self.w1, self.w2, self.w3) if ws is not None for w in ws)

    def expert(self, e: int, x_RD: torch.Tensor) -> torch.Tensor:
        w3 = self.w3[e] if self.w3 is not None else None
        return mlp(lambda x, w: w.matmul(x), x_RD, self.w1[e], self.w2[e], w3, self.activation)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The filled rows of each expert's group through it, other rows 0 (as the loop implementation)."""
        x = to_compute_dtype(x)
        groups = capacity_groups(x.shape[1], counts_E) if x.dim() == 3 else dropless_groups(counts_E)  # host sync
        x_RD = x.reshape(-1, x.shape[-1]).contiguous()
        out_RD = torch.zeros_like(x_RD)
        for e, start, rows in groups:
            if rows:
                out_RD[start:start + rows] = self.expert(e, x_RD[start:start + rows])
        return out_RD.view(x.shape)


def expert_weight_bytes(experts: nn.Module) -> int:
    if isinstance(experts, QuantizedExperts):
        return experts.nbytes()
    return sum(w.numel() * w.element_size() for w in (experts.w1, experts.w2, experts.w3) if w is not None)


def quantize_experts(model: nn.Module, mode: str, group_size: int = 32) -> tuple[int, int]:
    """Replace every MoE layer's routed experts by QuantizedExperts in place; (bytes before, bytes after)."""
    before = after = 0
    for layer in moe_layers(model).values():
        before += expert_weight_bytes(layer.experts)
        layer.experts = QuantizedExperts(layer.experts, mode, group_size)
        after += expert_weight_bytes(layer.experts)
    return before, after


def dequantized(weights: Optional[list]) -> Optional[torch.Tensor]:
    return None if weights is None else torch.stack([w.dequantize() for w in weights])


# -- export: a weights file whose routed experts are stored quantized -------------------------------------------------
# The expert tensor NAME ([E, O, I], e.g. layers.0.moe.experts.w1) is stored as NAME.q (int8 [E, O, I]) and NAME.scale
# (float32 [E, O]) for int8, NAME.q4 (uint8 [E, O, I / 2], two codes a byte) and NAME.scale_zero (float32
# [E, G, O, 2]) for int4; the sidecar's "quantization" says which, with "in_features" per tensor for int4.
STORED = {"int8": (".q", ".scale"), "int4": (".q4", ".scale_zero")}


def export_state(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to write, the sidecar's "quantization" entry) for a model whose experts quantize_experts replaced."""
    out = {k: v for k, v in state.items()}
    shapes, mode = {}, None
    for prefix, layer in moe_layers(model).items():
        experts = layer.experts
        assert isinstance(experts, QuantizedExperts), "quantize_experts(model) first"
        mode = experts.mode
        for which in ("w1", "w2", "w3"):
            weights = getattr(experts, which)
            if weights is None:
                continue
            name = f"{prefix}.experts.{which}"
            codes_name, scales_name = (name + suffix for suffix in STORED[mode])
            out[codes_name] = torch.stack([w.stored()[0] for w in weights])
            out[scales_name] = torch.stack([w.stored()[1] for w in weights])
            shapes[name] = [len(weights), *weights[0].dequantize().shape]
    return out, {"mode": mode, "shapes": shapes}


class DequantizingReader:
    """A weights file with quantized experts read as the float32 tensors they stand for (keys(), get(), shape_of(),
    dtype_of() of SafetensorsReader), so every tool that reads weights files reads it; moe-train-eval
    --quantize-experts with the same mode re-quantizes them to the same codes."""

    def __init__(self, reader, quantization: dict):
        self.reader, self.mode, self.shapes = reader, quantization["mode"], quantization["shapes"]
        if self.mode not in STORED:
            raise ValueError(f"unknown quantization mode {self.mode!r} (known: {', '.join(STORED)})")
        stored = {name + suffix for name in self.shapes for suffix in STORED[self.mode]}
        self._keys = [k for k in reader.keys() if k not in stored] + list(self.shapes)

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self.shapes[key]) if key in self.shapes else self.reader.shape_of(key)

    def dtype_of(self, key: str) -> torch.dtype:
        return torch.float32 if key in self.shapes else self.reader.dtype_of(key)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            return self.reader.get(key)
        codes, scales = (self.reader.get(key + suffix) for suffix in STORED[self.mode])
        in_features = self.shapes[key][-1]
        if self.mode == "int8":
            weights = [Int8Weight.from_stored(q, s) for q, s in zip(codes, scales)]
        else:
            weights = [Int4Weight.from_stored(q, s, in_features) for q, s in zip(codes, scales)]
        return dequantized(weights)
