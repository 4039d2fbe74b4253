"""`moe-train-eval`: a run's final logged val_loss reproduced from its weights or checkpoint (also a dp2 run's, and
masked chat data), HF directories, the --json contract, and bad overrides refused."""

from __future__ import annotations

import json
import pathlib

import pytest

from moe_train.evaluate import main
from moe_train.train import finish
from multiproc import run_ranks
from test_distributed_train import make_trainer, overrides

EXTRA = ("train.max_steps=4", "train.eval_every=2", "train.eval_batches=3", "checkpoint.every=2")


def train_and_save(rank: int, world_size: int, args: list[str], run_dir: str) -> float:
    trainer = make_trainer(args, world_size, rank, pathlib.Path(run_dir))
    last = trainer.train()
    finish(trainer, trainer.ctx, last)
    if rank == 0:  # what moe-train writes beside the weights (the evaluator reads the run's config from it)
        from omegaconf import OmegaConf

        (pathlib.Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(trainer.cfg)))
    return last.get("val_loss")


def eval_json(capsys, *argv: str) -> dict:
    main([*argv, "--json"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("data", ["embedded", "chat"])
def test_reproduces_the_final_val_loss_from_weights_and_checkpoints(tmp_path, capsys, data):
    extra = (*EXTRA, "data=chat", "data.chat_examples=400") if data == "chat" else EXTRA
    logged = train_and_save(0, 1, overrides("dropless", 1, extra), str(tmp_path))
    capsys.readouterr()
    from_weights = eval_json(capsys, str(tmp_path / "weights.safetensors"))
    assert from_weights["val_loss"] == logged
    assert set(from_weights) == {"val_loss", "perplexity", "tokens", "tokens_per_s"}
    assert from_weights["tokens"] > 0 and from_weights["tokens_per_s"] > 0
    assert from_weights["perplexity"] == pytest.approx(2.718281828 ** logged)
    assert eval_json(capsys, str(tmp_path / "checkpoints"))["val_loss"] == logged
    if data == "chat":
        assert from_weights["tokens"] < 3 * 2 * 32  # eval_batches x micro-batch x seq_len: prompts not counted


def test_reproduces_a_data_parallel_runs_val_loss(tmp_path, capsys):
    logged = run_ranks(2, train_and_save, overrides("dropless", 2, EXTRA), str(tmp_path))[0]
    assert eval_json(capsys, str(tmp_path / "weights.safetensors"))["val_loss"] == pytest.approx(logged, rel=1e-9)


def test_hf_directory_with_overrides(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    result = eval_json(capsys, str(tmp_path), "train.seq_len=32", "data.embedded_size=50000", "train.eval_batches=2")
    assert 5.0 < result["val_loss"] < 6.0  # an untrained model: about ln(256) = 5.55
    assert result["tokens"] == 2 * 16 * 32  # eval_batches x micro-batch (batch_size 16) x seq_len


@pytest.mark.parametrize("argv, message", [
    (["data=chat"], "takes key=value overrides of single keys"),
    (["train.eval_batchez=3"], "eval_batchez"),
])
def test_bad_overrides_exit_with_a_message(tmp_path, capsys, argv, message):
    train_and_save(0, 1, overrides("dropless", 1, ("train.max_steps=1", "train.eval_every=0")), str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "weights.safetensors"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_source_names_the_path(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.safetensors")])
    assert "nope.safetensors" in capsys.readouterr().err
