"""Instruction data (data=chat): record formats, bad records by line, prompt masking through packing, the task
mixture, and a masked loss in training and evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from moe_train.config.data import DataConfig, validate_data_config
from moe_train.data import build_data
from moe_train.data.chat import (END, IGNORE_INDEX, encode_conversation, mix_tasks, parse_record, read_jsonl,
                                 task_fractions)
from moe_train.data.instructions import TASKS, generate_instructions
from moe_train.data.tokenizer import ByteTokenizer
from moe_train.training.trainer import lm_loss


def write_jsonl(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return str(path)


def test_both_record_formats_and_the_template_masks_everything_but_responses():
    tok = ByteTokenizer()
    conv = parse_record({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi?"},
                                      {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": "Bye?"},
                                      {"role": "assistant", "content": "Bye."}], "task": "greet"})
    assert conv.task == "greet" and len(conv.turns) == 5
    ids, labels = encode_conversation(conv, tok)
    assert len(ids) == len(labels) and ids[-1] == tok.eos_id and labels[-1] == IGNORE_INDEX
    assert tok.decode(ids[:-1]) == ("<|system|>\nBe brief.\n<|user|>\nHi?\n<|assistant|>\nHello." + END +
                                    "<|user|>\nBye?\n<|assistant|>\nBye." + END)
    trained = tok.decode([i for i in labels if i != IGNORE_INDEX])
    assert trained == "Hello." + END + "Bye." + END
    simple = parse_record({"prompt": "2+2?", "response": "4"})
    assert simple.task == "default" and simple.turns == (("user", "2+2?"), ("assistant", "4"))


BAD_LINES = [
    ("{not json", "line 2: invalid JSON"),
    (json.dumps({"prompt": "x"}), 'line 2: a record needs "prompt" and "response", or "messages"'),
    (json.dumps({"prompt": "x", "response": "  "}), "line 2: empty response"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "line 2: empty response"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"line 2: messages\[0\].role='bot'"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_records_are_reported_with_their_line_number(tmp_path, line, message):
    good = {"prompt": "a", "response": "b"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(ValueError, match=message) as err:
        read_jsonl(path, "error")
    assert path in str(err.value)
    said = []
    assert len(read_jsonl(path, "skip", said.append)) == 2
    assert said and "skipped 1 bad record(s)" in said[0] and "line 2" in said[0]


def chat_cfg(**overrides) -> DataConfig:
    return DataConfig(**{"source": "chat", "chat_examples": 600, **overrides})


def test_packed_batches_keep_inputs_and_mask_prompt_targets():
    data = build_data(chat_cfg(), seq_len=64, micro_batch_size=4, say=lambda m: None)
    tok = data.tokenizer
    inputs, targets, task_ids = data.train.next_batch()  # chat data always carries its records' tasks
    counted = targets != IGNORE_INDEX
    assert 0.1 < counted.float().mean() < 0.6  # prompts and headers dominate these short records
    assert torch.equal(targets[:, :-1][counted[:, :-1]], inputs[:, 1:][counted[:, :-1]])  # labels are the tokens
    trained = "".join(tok.decode(t[t != IGNORE_INDEX].tolist()) for _, targets, _ in data.val for t in targets)
    assert "<|user|>" not in trained and "<|assistant|>" not in trained and trained.count(END) > 10


def test_task_weights_resample_training_records_only():
    records = [parse_record(r) for r in generate_instructions(2000)]
    weights = {"add": 3.0, "reverse": 1.0, "upper": 0.0, "sort": 1.0, "capital": 0.0}
    mixed = task_fractions(mix_tasks(records, weights, seed=0))
    assert set(mixed) == {"add", "reverse", "sort"}
    assert mixed["add"] == pytest.approx(0.6, abs=0.04) and mixed["sort"] == pytest.approx(0.2, abs=0.04)
    with pytest.raises(ValueError, match=r"unlisted \['capital', 'sort', 'upper'\], not in the data \['math'\]"):
        mix_tasks(records, {"add": 1.0, "reverse": 1.0, "math": 1.0}, seed=0)
    assert len(TASKS) == 5


@pytest.mark.parametrize("overrides, message", [
    ({"on_bad_record": "warn"}, r"data.on_bad_record='warn'.*'error', 'skip'"),
    ({"task_weights": {"add": -1.0}}, r"data.task_weights.*finite weights >= 0"),
    ({"task_weights": {"add": 0.0}}, r"at least one weight > 0"),
    ({"source": "embedded", "task_weights": {"add": 1.0}}, r"unless data.source='chat'"),
])
def test_chat_config_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_data_config(chat_cfg(**overrides))


def test_masked_loss_is_the_mean_over_counted_targets_and_zero_without_any():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :3] = IGNORE_INDEX
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(lm_loss(logits, targets), expected)
    assert lm_loss(logits, torch.full_like(targets, IGNORE_INDEX)) == 0


def test_trainer_evaluates_the_masked_loss_over_response_tokens(tmp_path):
    from test_distributed_train import make_trainer, overrides

    trainer = make_trainer(overrides("dropless", 1, ("data=chat", "data.chat_examples=400", "train.max_steps=2")),
                           1, 0, tmp_path)
    trainer.train()
    loss, tokens = trainer.evaluate_sums()
    expected = sum(int((targets != IGNORE_INDEX).sum()) for _, targets, _ in trainer.data.val)
    assert tokens == expected and 0 < tokens < sum(t.numel() for _, t, _ in trainer.data.val)
    assert 0 < loss < 10
