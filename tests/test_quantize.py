"""Weight-only quantized experts (moe_train.serving.quantize, `moe-train-eval --quantize-experts`): error bounds of
the codes, the CPU kernels against the dequantized reference, the quantized experts against GroupedExperts holding the
dequantized weights (dropless rows and capacity buffers), autocast's dtype kept, and the export read back."""

from __future__ import annotations

import json

import pytest
import torch

from moe_train.evaluate import main as eval_main
from moe_train.interop.cli import main as convert_main
from moe_train.interop.hf import load_mixtral, load_weights
from moe_train.models.moe.experts import GroupedExperts
from moe_train.serving import quantize as q
from test_compress import trained  # noqa: F401  (module fixture: a trained 6-expert run)


def weight(out_features=48, in_features=64, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(out_features, in_features) * 0.05


def test_int8_codes_are_within_half_a_step_per_output_channel():
    w = weight()
    q8 = q.Int8Weight(w)
    assert q8.q_OI.dtype == torch.int8 and q8.q_OI.abs().max() == 127  # the largest |w| of a row maps to 127
    assert ((q8.dequantize() - w).abs() <= q8.scale_O[:, None] / 2 + 1e-7).all()
    assert q8.nbytes() == 48 * 64 + 4 * 48


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_codes_are_within_half_a_step_per_group(group_size):
    w = weight()
    q4 = q.Int4Weight(w, group_size)
    codes = q4.codes()
    assert codes.min() == 0 and codes.max() == 15 and q4.packed.shape == (48, 32)
    scale_OG = q4.scale_zero_GO2[..., 0].t()
    step = scale_OG.repeat_interleave(group_size, dim=1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-7).all()
    assert q4.nbytes() == 48 * 32 + 4 * 2 * 48 * (64 // group_size)


def test_int4_packing_round_trips_odd_widths():
    codes = torch.randint(0, 16, (5, 7), dtype=torch.uint8)
    assert torch.equal(q.unpack_int4(q.pack_int4(codes), 7), codes)


@pytest.mark.parametrize("mode", q.MODES)
def test_cpu_kernels_equal_the_dequantized_reference(mode):
    w, x = weight(), torch.randn(10, 64)
    qw = q.quantize_weight(w, mode, 32)
    reference = x @ qw.dequantize().t()
    torch.testing.assert_close(qw.matmul(x), reference)  # float32: the dequantized GEMM itself
    x16 = x.bfloat16()
    assert q.use_kernel(x16)
    torch.testing.assert_close(qw.matmul(x16).float(), x16.float() @ qw.dequantize().t(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", q.MODES)
@pytest.mark.parametrize("layout", ["dropless", "capacity"])
def test_quantized_experts_equal_grouped_experts_with_dequantized_weights(mode, layout):
    torch.manual_seed(1)
    experts = GroupedExperts(4, 64, 96, "swiglu")
    quantized = q.QuantizedExperts(experts, mode)
    reference = GroupedExperts(4, 64, 96, "swiglu")
    with torch.no_grad():
        for name in ("w1", "w2", "w3"):
            getattr(reference, name).copy_(q.dequantized(getattr(quantized, name)))
    counts_E = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 64) if layout == "dropless" else torch.randn(4, 6, 64)
    torch.testing.assert_close(quantized(x, counts_E), reference(x, counts_E).detach())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not cover the kernels: the cast is ours
        assert quantized(x, counts_E).dtype == torch.bfloat16


def test_quantize_experts_replaces_every_layer_and_counts_bytes():
    from moe_train.models.moe.layer import MoELayer
    from moe_train.config.moe import MoEConfig

    model = torch.nn.ModuleList([MoELayer(64, MoEConfig(num_experts=4, top_k=2, d_ff=32)) for _ in range(2)])
    before, after = q.quantize_experts(model, "int8")
    assert before == 2 * 3 * 4 * 32 * 64 * 4  # float32
    assert after == 2 * (2 * 4 * (32 * 64 + 4 * 32) + 4 * (64 * 32 + 4 * 64))  # w1, w3 [F, D]; w2 [D, F]
    assert all(isinstance(m.experts, q.QuantizedExperts) for m in model)


@pytest.mark.parametrize("mode, group_size, message", [
    ("int3", 32, "--quantize-experts 'int3'"), ("int4", 48, "--group-size 48")])
def test_bad_settings_are_refused(mode, group_size, message):
    with pytest.raises(ValueError, match=message):
        q.check_quantization(mode, group_size)


def test_int4_group_must_divide_the_width():
    with pytest.raises(ValueError, match="group size 64 does not divide the expert input width 96"):
        q.Int4Weight(weight(8, 96), 64)


# -- moe-train-eval --------------------------------------------------------------------------------------------------
def eval_json(capsys, *argv) -> dict:
    capsys.readouterr()
    eval_main([*map(str, argv), "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", q.MODES)
def test_eval_reports_and_exports_quantized_experts(trained, tmp_path, capsys, mode):  # noqa: F811
    out = tmp_path / f"{mode}.safetensors"
    result = eval_json(capsys, trained, "--quantize-experts", mode, "--save-quantized", out)
    info = result["quantization"]
    assert info["val_loss_unquantized"] == eval_json(capsys, trained)["val_loss"]
    assert info["val_loss_delta"] == pytest.approx(result["val_loss"] - info["val_loss_unquantized"])
    assert abs(info["val_loss_delta"]) < 0.02 and info["tokens_per_s_unquantized"] > 0
    assert info["expert_bytes"] < info["expert_bytes_unquantized"] / (3.5 if mode == "int8" else 5.0)
    # the export: read back dequantized by every tool, re-quantized to the same codes by --quantize-experts
    assert eval_json(capsys, out)["val_loss"] == result["val_loss"]
    assert eval_json(capsys, out, "--quantize-experts", mode)["val_loss"] == pytest.approx(result["val_loss"], abs=1e-6)
    model = load_weights(out)
    convert_main(["to-hf", str(out), str(tmp_path / "hf")])
    tokens = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(load_mixtral(tmp_path / "hf")(tokens), model(tokens))


def test_save_quantized_needs_a_mode_and_a_new_path(trained, tmp_path, capsys):  # noqa: F811
    with pytest.raises(SystemExit):
        eval_main([str(trained), "--save-quantized", str(tmp_path / "x.safetensors")])
    assert "--save-quantized needs --quantize-experts" in capsys.readouterr().err
    (tmp_path / "x.safetensors").write_text("keep")
    with pytest.raises(SystemExit):
        eval_main([str(trained), "--quantize-experts", "int8", "--save-quantized", str(tmp_path / "x.safetensors")])
    assert "already exists" in capsys.readouterr().err and (tmp_path / "x.safetensors").read_text() == "keep"
