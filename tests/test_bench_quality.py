"""bench/quality.py: the quick run trains its configs once (a second call only reports), every config composes and
validates, and 'beats the dense twin' means every seed below every dense seed."""

from __future__ import annotations

import json

import pytest

from helpers import load_bench_script
from moe_train.cli_config import compose_config
from moe_train.config import validate_config
from moe_train.data import DOMAINS


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("quality")


@pytest.mark.parametrize("d_model", [128, 256])
def test_every_config_composes_validates_and_has_the_dense_twins_active_ffn_width(bench, d_model):
    for corpus in bench.CORPORA:
        for config in bench.CONFIGS:
            cfg = compose_config(bench.run_overrides(corpus, config, 0, 10, 5, quick=False, d_model=d_model))
            validate_config(cfg)
            m, moe = cfg.model, cfg.moe
            active = m.d_ff if m.moe_every == 0 else moe.top_k * moe.d_ff + moe.num_shared_experts * moe.d_ff
            assert m.d_model == d_model and m.d_model // m.n_heads == 32, config
            assert active == (16 if config == "dense_total" else 4) * d_model, config


def test_wider_runs_are_stored_and_reported_apart_from_the_d128_runs(bench, tmp_path):
    with pytest.raises(SystemExit, match="--d-model 96"):
        bench.scaled(bench.SHAPE, 96)
    for d_model in (128, 256):
        path = bench.result_path(tmp_path, "embedded", "dense", 0, 20, d_model)
        path.write_text(json.dumps({"corpus": "embedded", "config": "dense", "seed": 0, "d_model": d_model}))
    (tmp_path / "embedded__top2_dropless__s0__20.json").write_text(  # stored before --d-model: a d 128 run
        json.dumps({"corpus": "embedded", "config": "top2_dropless", "seed": 0}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embedded__dense__s0__20.json", "embedded__dense__s0__d256__20.json", "embedded__top2_dropless__s0__20.json"]
    assert set(bench.load_results(tmp_path, 20)) == {("embedded", "dense"), ("embedded", "top2_dropless")}
    assert [r["d_model"] for r in bench.load_results(tmp_path, 20, 256)[("embedded", "dense")]] == [256]


def test_beats_needs_every_seed_below_every_dense_seed(bench):
    dense = {"n": 3, "mean": 2.0, "min": 1.98, "max": 2.02}
    row = lambda lo, hi: {"n": 3, "mean": (lo + hi) / 2, "min": lo, "max": hi}  # noqa: E731
    assert bench.beats(row(1.90, 1.97), dense) == "**yes**"
    assert bench.beats(row(1.90, 1.99), dense) == "within spread"
    assert bench.beats(row(2.00, 2.10), dense) == "no"
    assert bench.beats({**row(1.0, 1.0), "n": 1}, dense) == "(1 seed)"


def test_quick_run_is_resumable_and_reports(bench, tmp_path, monkeypatch):
    results, out, raw, png = tmp_path / "results", tmp_path / "q.md", tmp_path / "q.json", tmp_path / "q.png"
    args = ["--quick", "--results", str(results), "--out", str(out), "--json", str(raw), "--plot", str(png)]
    bench.main(args)
    stored = sorted(p.name for p in results.iterdir())
    assert stored == ["embedded__dense__s0__20.json", "embedded__top2_dropless__s0__20.json"]
    rows = json.loads(raw.read_text())
    assert set(rows) == {"embedded/dense", "embedded/top2_dropless"} and rows["embedded/dense"]["n"] == 1
    monkeypatch.setattr(bench, "train_one", lambda overrides: pytest.fail("a stored run was trained again"))
    text = bench.main(args)
    assert "| top2_dropless |" in text and "| dense |" in text and out.read_text() == text
    assert "| entropy of the generators (floor) |" in text and "| top2_dropless (1 seed) |" in text
    for name in stored:  # the per-domain losses split the final validation loss
        run = json.loads((results / name).read_text())
        per = run["val_by_domain"]
        assert set(per) == set(DOMAINS) and set(run["entropy_floor"]) == {*DOMAINS, "all"}
        assert sum(loss * n for loss, n in per.values()) / sum(n for _, n in per.values()) == \
            pytest.approx(run["final_val"], rel=1e-6)
        late = run["val_by_domain_late"]  # window positions >= 64 of the same targets: half of them
        assert sum(n for _, n in late.values()) * 2 == sum(n for _, n in per.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_horizon_marks_where_every_seed_beats_every_dense_seed_or_only_its_same_seed_dense_run(bench):
    run = lambda config, seed, curve: {"corpus": "embedded", "config": config, "seed": seed,  # noqa: E731
                                       "val_loss": {str(s): v for s, v in zip((100, 200, 300), curve)}}
    groups = {("embedded", "dense"): [run("dense", 0, [2.0, 1.8, 1.60]), run("dense", 1, [2.1, 1.9, 1.62])],
              ("embedded", "top2_dropless"): [run("top2_dropless", 0, [2.2, 1.79, 1.50]),
                                              run("top2_dropless", 1, [2.3, 1.85, 1.55])]}
    lines = bench.horizon(groups, "embedded")
    assert "| config | 100 | 200 | 300 |" in lines
    assert "| top2_dropless | +0.2000 | -0.0300+ | -0.0850* |" in lines
    assert bench.paired(groups["embedded", "top2_dropless"], groups["embedded", "dense"], 200) == \
        pytest.approx((-0.05, -0.01))


def test_by_domain_weighs_the_floor_by_the_validation_tokens_and_subtracts_dense(bench):
    def run(config, seed, a, b):
        return {"corpus": "embedded", "config": config, "seed": seed, "final_val": (a * 30 + b * 10) / 40,
                "val_by_domain": {"math": [a, 30], "code": [b, 10]},
                "entropy_floor": {"math": 0.5, "code": 1.5, "all": 9.9}}

    late = {"val_by_domain_late": {"math": [0.8, 15], "code": [1.6, 5]}}
    groups = {("embedded", "dense"): [{**run("dense", 0, 1.0, 2.0), **late}, {**run("dense", 1, 1.2, 2.2), **late}],
              ("embedded", "top2_dropless"): [run("top2_dropless", 0, 1.0, 2.0)],
              ("embedded", "sigmoid"): [{"corpus": "embedded", "config": "sigmoid", "seed": 0, "final_val": 1.0}]}
    lines = bench.by_domain(groups, "embedded")
    assert "| | math | code | all |" in lines and "| share of the validation tokens | 75% | 25% | 100% |" in lines
    assert "| entropy of the generators (floor) | 0.5000 | 1.5000 | 0.7500 |" in lines  # 0.5 x 3/4 + 1.5 x 1/4
    assert "| dense (2 seeds) | 1.1000 | 2.1000 | 1.3500 |" in lines
    assert "| top2_dropless (1 seed) | 1.0000 (-0.1000) | 2.0000 (-0.1000) | 1.2500 (-0.1000) |" in lines
    assert "| dense (2 seeds), window positions >= 64 | 0.8000 | 1.6000 | 1.0000 |" in lines
    assert not any(line.startswith("| top2_dropless (1 seed), window") for line in lines)  # it has no late losses
    assert not any("sigmoid" in line for line in lines)  # runs stored before the per-domain losses: left out
    assert bench.by_domain({("embedded", "sigmoid"): groups["embedded", "sigmoid"]}, "embedded") == []
