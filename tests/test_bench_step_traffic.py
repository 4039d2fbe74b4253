"""bench/step_traffic.py: Inductor's byte counts split into compute-bound GEMMs and memory-bound kernels, the linear
fit in the token count, and the floor and bound it reports."""

from __future__ import annotations

import pytest
import torch

from helpers import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("step_traffic")


def test_wide_gemm_is_compute_bound_and_narrow_gemm_counts_as_memory(bench):
    """float32 so every byte is known: the wide mm reads two [256, 256] and writes one; the narrow one (N = 8, the
    router's shape) and the elementwise add are memory-bound."""
    wide, narrow = torch.randn(256, 256), torch.randn(256, 8)

    def f(x):
        return (x @ wide).sum() + (x @ narrow).sum()

    graphs = []
    torch._dynamo.reset()
    with bench.recording_kernels(graphs):
        torch.compile(f, fullgraph=True)(torch.randn(256, 256))
    assert len(graphs) == 1
    assert graphs[0].gemm == 3 * 256 * 256 * 4  # x, wide, out
    assert graphs[0].gemms == 1
    # the narrow mm reads x and narrow and writes [256, 8]; the rest reduces the two products to a scalar
    assert graphs[0].memory >= (256 * 256 + 2 * 256 * 8) * 4


def test_gemm_dims_of_grouped_and_batched_shapes(bench):
    class FakeBuf:
        def __init__(self, *size):
            self.size = size

        def get_size(self):
            return list(self.size)

    class FakeKernel:
        def __init__(self, name, *inputs):
            self.python_kernel_name, self.inputs = name, list(inputs)

    class ExternKernelSchedulerNode:  # the class name is what gemm_dims checks
        def __init__(self, node):
            self.node = node

    def dims(name, *inputs):
        return bench.gemm_dims(ExternKernelSchedulerNode(FakeKernel(name, *inputs)))

    # grouped mm: rows [R, K] x experts [E, K, N] with offsets; its weight gradient [K, R] x [R, N]
    assert dims("torch.ops.aten._grouped_mm.default", FakeBuf(4096, 1024), FakeBuf(8, 1024, 2816), FakeBuf(8)) == \
        (4096, 1024, 2816)
    assert dims("torch.ops.aten._grouped_mm.default", FakeBuf(1024, 4096), FakeBuf(4096, 2816), FakeBuf(8)) == \
        (1024, 4096, 2816)
    assert dims("extern_kernels.bmm", FakeBuf(8, 320, 1024), FakeBuf(8, 1024, 2816)) == (2560, 1024, 2816)
    assert dims("extern_kernels.addmm", FakeBuf(8), FakeBuf(2048, 1024), FakeBuf(1024, 8)) == (2048, 1024, 8)
    assert dims("torch.ops.aten.sort.stable", FakeBuf(4096)) is None


def row(bench, name, params, per_token, fixed):
    return bench.Row(name, params, per_token, fixed, gemm_per_token=0.0, kernels=1)


def test_floor_and_bound_from_synthetic_rows(bench):
    """1 layer, 1000 tokens, 1e9 B/s: the MoE's extra bytes = 1000 x (3000 - 1000) + (5e6 - 1e6) + 3e5 x 40
    = 1.8e7 B = 18 ms; with a 100 ms dense step the bound is 100 / 118."""
    args = bench.parse_args(["--layers", "1", "--tokens", "1000", "--bandwidth", "1e9", "--dense-ms", "100"])
    rows = [row(bench, "dense FFN", 100_000, 1000.0, 1e6), row(bench, "MoE, dropless", 400_000, 3000.0, 5e6)]
    extra = rows[1].step_bytes(1000, 1) - rows[0].step_bytes(1000, 1)
    assert extra == pytest.approx(1000 * 2000 + 4e6 + 300_000 * (bench.OPTIMIZER_BYTES + bench.CLIP_BYTES))
    assert extra == pytest.approx(1.8e7)
    text = bench.report(rows, args)
    assert "| MoE, dropless | 0.4M | 1 | 3.0 | 5 (12.5) |" in text and "+18.0 |" in text
    assert "16.0 ms from the extra parameters" in text and "2.0 ms from the tokens" in text  # 4e6 + 1.2e7; 2e6
    assert "step >= 118.0 ms, tokens/s <= 0.847x the dense twin's" in text


def test_fit_is_exact_for_linear_bytes_and_refuses_probes_that_change_the_graph(bench):
    def measure(tokens):
        return bench.KernelBytes(gemm=10 * tokens, memory=500 + 7 * tokens, kernels=5, gemms=2)

    memory, gemm, kernels = bench.fit_bytes(measure, (100, 300))
    assert (memory.per_token, memory.fixed, gemm.per_token, gemm.fixed, kernels) == (7, 500, 10, 0, 5)
    assert memory.at(1000) == 7500

    def changing(tokens):
        return bench.KernelBytes(gemm=0, memory=tokens, kernels=5, gemms=1 if tokens < 200 else 2)

    with pytest.raises(ValueError, match="100 and 300 differ.*larger --probe-tokens"):
        bench.fit_bytes(changing, (100, 300))
    with pytest.raises(SystemExit):
        bench.parse_args(["--probe-tokens", "512", "512"])


def test_toy_run_counts_the_cast_bytes_of_float32_weights(bench, tmp_path):
    """Compiled at a toy width: the dense FFN's memory-bound bytes that do not grow with tokens are the bf16 cast of
    each float32 weight (read 4, write 2) and the cast of its bf16 gradient back (read 2, write 4): 12 B per
    parameter; the MoE layer moves more bytes per token than the dense FFN (gather, combine, routing)."""
    out = tmp_path / "traffic.md"
    bench.main(["--d-model", "128", "--d-ff", "128", "--experts", "4", "--capacity-factor", "0", "--layers", "2",
                "--tokens", "4096", "--probe-tokens", "1024", "2048", "--dense-ms", "10", "--out", str(out),
                "--json", str(tmp_path / "traffic.json")])
    text = out.read_text()
    assert text.startswith("    python bench/step_traffic.py --d-model 128")
    dense, moe = (line for line in text.splitlines() if line.startswith(("| dense FFN", "| MoE, dropless")))
    assert "(12.0)" in dense
    assert float(moe.split(" | ")[3]) > float(dense.split(" | ")[3])  # KB per token
    assert "MoE, dropless: step >= " in text
