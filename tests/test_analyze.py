"""`moe-train-analyze`: mutual information and byte classes against hand-computed values, every top-k choice of
every validation token counted once per layer, and the JSON / PNG outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_train.analyze import CLASSES, byte_classes, conditional_mutual_information, main, mutual_information
from test_compress import trained  # noqa: F401  (module fixture: a trained 6-expert run on the embedded corpus)


def test_mutual_information_in_bits():
    assert mutual_information(torch.ones(3, 4)) == pytest.approx(0.0)  # independent
    assert mutual_information(torch.eye(4) * 5) == pytest.approx(2.0)  # the expert names the group: log2(4)
    half = torch.tensor([[2, 0], [1, 1]])  # p(g,e) = [[.5, 0], [.25, .25]]
    expected = 0.5 * math.log2(0.5 / (0.5 * 0.75)) + 0.25 * math.log2(0.25 / (0.5 * 0.75)) \
        + 0.25 * math.log2(0.25 / (0.5 * 0.25))
    assert mutual_information(half) == pytest.approx(expected)


def test_conditional_mutual_information_is_the_class_weighted_mean():
    # class 0: domain names the expert (1 bit); class 1: independent (0 bits); class 0 holds 3/4 of the pairs
    counts_DCE = torch.zeros(2, 2, 2)
    counts_DCE[:, 0] = torch.eye(2) * 3
    counts_DCE[:, 1] = torch.ones(2, 2) / 2
    assert conditional_mutual_information(counts_DCE) == pytest.approx(0.75 * 1.0)
    # domains that differ only through their classes carry nothing once the class is known
    same_DCE = torch.tensor([[[4.0, 0], [0, 1]], [[1, 0], [0, 4]]])
    assert mutual_information(same_DCE.sum(1)) > 0.2 and conditional_mutual_information(same_DCE) == pytest.approx(0)


def test_byte_classes():
    table = byte_classes()
    for text, name in (("aZ", "letters"), ("07", "digits"), (" \n\t", "whitespace"), (".,{}", "punctuation")):
        assert all(CLASSES[table[ord(c)]] == name for c in text)
    assert CLASSES[table[0]] == "other" and CLASSES[table[200]] == "other"


def test_every_choice_is_counted_and_the_outputs_are_written(trained, tmp_path, capsys):  # noqa: F811
    main([str(trained), "--batches", "3", "--out", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((tmp_path / "routing.json").read_text())
    tokens = 3 * 2 * 32  # batches x micro-batch x seq_len of the fixture's run
    for layer in report["layers"].values():
        for kind in ("domains", "classes"):
            assert sum(layer[kind]["pairs"].values()) == tokens * 2  # top-2: every choice once
            assert 0 <= layer[kind]["mutual_information_bits"] <= layer[kind]["max_bits"]
            assert all(sum(s) == pytest.approx(1.0, abs=1e-3) for g, s in layer[kind]["shares"].items()
                       if layer[kind]["pairs"][g])
        assert 0 <= layer["domains"]["given_class_bits"] <= layer["domains"]["max_bits"]
    assert list(report["layers"]["layers.0.moe"]["domains"]["shares"]) == [
        "story", "code", "math", "csv", "json", "dialogue"]
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main([str(trained), "--batches", "0"])
    assert "--batches 0: must be >= 1" in capsys.readouterr().err
