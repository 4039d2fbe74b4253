"""Instruction data (`data.source=chat`): conversations -> token stream + label stream with prompts masked.

Record formats (one JSON object per line; optional "task", default "default"):
    {"prompt": "...", "response": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   (at least one assistant turn)

Template (plain text, so it works with the byte tokenizer and any tokenizer.json):
    system / user turn:   "<|ROLE|>\n" + content + "\n"                  all masked
    assistant turn:       "<|assistant|>\n" masked, content + "<|end|>\n" trained
    after the record:     the tokenizer's separator (masked)
The label stream holds the token id where the loss counts and IGNORE_INDEX elsewhere; packing cuts both streams into
the same rows, the trainer's cross-entropy ignores IGNORE_INDEX targets, so the loss (training, evaluation, metrics)
is the mean over response tokens. A record may straddle two packed rows (as in pre-training); the second row then
starts mid-record without its prompt.

Records are split before any resampling: the last data.val_fraction of the records validate. data.task_weights
resamples the training records only (with replacement, seeded by data.seed).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from moe_train.config.data import DataConfig
from moe_train.data.instructions import generate_instructions
from moe_train.data.packing import Stream

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
ROLES = ("system", "user", "assistant")
END = "<|end|>\n"


@dataclass(frozen=True)
class Conversation:
    task: str
    turns: tuple[tuple[str, str], ...]  # (role, content)


class BadRecord(ValueError):
    pass


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def _messages(messages) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord('"messages" must be a non-empty list of {"role", "content"} objects')
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRecord(f'messages[{i}] must be an object with "role" and "content"')
        if message["role"] not in ROLES:
            raise BadRecord(f"messages[{i}].role={message['role']!r}; allowed: {', '.join(ROLES)}")
        turns.append((message["role"], _text(message["content"], f"messages[{i}].content")))
    return tuple(turns)


def parse_record(record) -> Conversation:
    """A Conversation from one decoded record; BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = _messages(record["messages"])
    elif "prompt" in record and "response" in record:
        turns = (("user", _text(record["prompt"], '"prompt"')), ("assistant", _text(record["response"], '"response"')))
    else:
        raise BadRecord(f'a record needs "prompt" and "response", or "messages"; it has {sorted(record)}')
    responses = [content for role, content in turns if role == "assistant"]
    if not responses or not all(content.strip() for content in responses):
        raise BadRecord("empty response: every record needs an assistant turn with non-blank content")
    return Conversation(str(record.get("task", "default")), turns)


def read_jsonl(path: str, on_bad_record: str, say=print) -> list[Conversation]:
    """Every record of a JSON-lines file; a bad one raises (naming the line) or is skipped and counted."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data.path={path!r} does not exist or is not a file; data.source='chat' needs a JSON-lines "
                         f"file (or data.path=null for the generated instruction set)")
    conversations, skipped = [], []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            conversations.append(parse_record(_decode(line)))
        except BadRecord as err:
            if on_bad_record == "error":
                raise ValueError(f"data.path={path!r} line {number}: {err} (data.on_bad_record=skip drops such "
                                 f"records)") from None
            skipped.append(f"line {number}: {err}")
    if skipped:
        say(f"data: skipped {len(skipped)} bad record(s) of {path}: " + "; ".join(skipped[:3])
            + (" ..." if len(skipped) > 3 else ""))
    if not conversations:
        raise ValueError(f"data.path={path!r} has no usable record")
    return conversations


def _decode(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise BadRecord(f"invalid JSON ({err.msg} at column {err.colno})") from None


def load_conversations(cfg: DataConfig, say=print) -> list[Conversation]:
    if cfg.path is None:
        return [parse_record(r) for r in generate_instructions(cfg.chat_examples, cfg.seed)]
    return read_jsonl(cfg.path, cfg.on_bad_record, say)


# -- tokens and labels ----------------------------------------------------------------------------------------------

def _pieces(conversation: Conversation) -> Iterator[tuple[str, bool]]:
    """(text, trained) pieces of the template."""
    for role, content in conversation.turns:
        if role == "assistant":
            yield "<|assistant|>\n", False
            yield content + END, True
        else:
            yield f"<|{role}|>\n{content}\n", False


def encode_conversation(conversation: Conversation, tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, labels): labels are the ids of trained pieces and IGNORE_INDEX elsewhere."""
    ids, labels = [], []
    for text, trained in _pieces(conversation):
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    separator = list(tokenizer.separator)
    return ids + separator, labels + [IGNORE_INDEX] * len(separator)


def encode_conversations(conversations: list[Conversation], tokenizer,
                         task_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 (token stream, label stream, task stream) of the conversations in order; the task stream holds each
    token's conversation's task, as an index into `task_names`."""
    index = {name: i for i, name in enumerate(task_names)}
    ids, labels, tasks = [], [], []
    for conversation in conversations:
        i, l = encode_conversation(conversation, tokenizer)
        ids.append(np.asarray(i, dtype=np.int32))
        labels.append(np.asarray(l, dtype=np.int32))
        tasks.append(np.full(len(i), index[conversation.task], dtype=np.int32))
    return tuple(torch.from_numpy(np.concatenate(parts)) for parts in (ids, labels, tasks))


# -- split and mixture ----------------------------------------------------------------------------------------------

def split_records(conversations: list, val_fraction: float) -> tuple[list, list]:
    """(first 1 - val_fraction of the records, the rest); ValueError if either is empty."""
    n_train = int(len(conversations) * (1.0 - val_fraction))
    if n_train < 1 or n_train == len(conversations):
        raise ValueError(f"{len(conversations)} chat records cannot be split by data.val_fraction={val_fraction} "
                         f"into non-empty training and validation records; use more records")
    return conversations[:n_train], conversations[n_train:]


def mix_tasks(conversations: list[Conversation], weights: dict[str, float], seed: int) -> list[Conversation]:
    """len(conversations) records drawn with replacement: task t with probability w_t / sum w, then uniformly
    among its records. {} = unchanged. ValueError naming tasks missing from either side."""
    if not weights:
        return conversations
    by_task: dict[str, list[Conversation]] = {}
    for conversation in conversations:
        by_task.setdefault(conversation.task, []).append(conversation)
    _check_weights(set(by_task), weights)
    rng = random.Random(f"moe_train.chat/{seed}")
    tasks = sorted(t for t in by_task if weights[t] > 0)
    chosen = rng.choices(tasks, weights=[weights[t] for t in tasks], k=len(conversations))
    return [rng.choice(by_task[task]) for task in chosen]


def _check_weights(present: set[str], weights: dict[str, float]) -> None:
    unlisted, unknown = sorted(present - set(weights)), sorted(set(weights) - present)
    if unlisted or unknown:
        raise ValueError(f"data.task_weights={dict(weights)} must name exactly the tasks of the training data "
                         f"{sorted(present)}: unlisted {unlisted}, not in the data {unknown}")
    if not any(weights[t] > 0 for t in present):
        raise ValueError(f"data.task_weights={dict(weights)} gives every task weight 0")


def task_fractions(conversations: list[Conversation]) -> dict[str, float]:
    counts: dict[str, int] = {}
    for conversation in conversations:
        counts[conversation.task] = counts.get(conversation.task, 0) + 1
    return {task: n / len(conversations) for task, n in sorted(counts.items())}


def chat_streams(cfg: DataConfig, tokenizer, say=print) -> tuple[Stream, Stream, list[str]]:
    """(train, val, task names) of data.source=chat; task ids index the sorted task names of all records."""
    conversations = load_conversations(cfg, say)
    task_names = sorted({c.task for c in conversations})
    train, val = split_records(conversations, cfg.val_fraction)
    train = mix_tasks(train, dict(cfg.task_weights), cfg.seed)
    return (Stream(*encode_conversations(train, tokenizer, task_names)),
            Stream(*encode_conversations(val, tokenizer, task_names)), task_names)
