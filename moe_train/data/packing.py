"""Documents -> one token stream -> train/validation halves -> fixed-length sequences.

The stream is every document's tokens followed by the tokenizer's separator (byte 0 for the byte tokenizer, the eos
id for HF tokenizers), held in memory as int32 (4 bytes/token: 20M tokens = 80 MB). The first (1 - val_fraction) of
it trains, the last val_fraction validates. Each half is cut into non-overlapping rows of seq_len + 1 tokens
(inputs = row[:-1], targets = row[1:]); the tail shorter than a row is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch


@dataclass
class Stream:
    """A token stream and the per-token streams aligned with it (same length), held in memory."""

    tokens: torch.Tensor  # int32
    labels: Optional[torch.Tensor] = None  # the targets where they are not the tokens (chat: IGNORE_INDEX on prompts)
    tasks: Optional[torch.Tensor] = None  # each token's task id (chat records' "task"; data.task_of_domain)

    def cut(self, start: int, stop: Optional[int] = None) -> "Stream":
        pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return Stream(self.tokens[start:stop], pick(self.labels), pick(self.tasks))


def _chunks(texts: Iterable[str], tokenizer) -> Iterator[np.ndarray]:
    separator = list(tokenizer.separator)
    for text in texts:
        yield np.asarray(tokenizer.encode(text) + separator, dtype=np.int32)


def encode_documents(texts: Iterable[str], tokenizer, max_tokens: Optional[int] = None) -> torch.Tensor:
    """The int32 token stream of `texts`, each followed by the separator; reading stops (and the stream is cut) once
    `max_tokens` tokens are collected, so a streaming source is only read that far."""
    chunks, total = [], 0
    for chunk in _chunks(texts, tokenizer):
        chunks.append(chunk)
        total += len(chunk)
        if max_tokens is not None and total >= max_tokens:
            break
    if total == 0:
        raise ValueError("the data source produced no text (0 tokens); check data.source, data.path/name, data.split")
    return torch.from_numpy(np.concatenate(chunks)[:max_tokens])


def domain_labels(pairs: Sequence[tuple[str, str]], tokenizer, domains: Sequence[str]) -> torch.Tensor:
    """Per-token domain index (into `domains`), aligned with encode_documents([t for _, t in pairs], tokenizer);
    a separator carries the label of the document it ends. For tagging tokens in expert-specialisation analyses."""
    index = {d: i for i, d in enumerate(domains)}
    lengths = [len(c) for c in _chunks((t for _, t in pairs), tokenizer)]
    labels = [np.full(n, index[d], dtype=np.int8) for (d, _), n in zip(pairs, lengths)]
    return torch.from_numpy(np.concatenate(labels))


def split_stream(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(first 1 - val_fraction of the stream, last val_fraction), views without copies."""
    n_train = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n_train], tokens[n_train:]


def pack_sequences(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[num_rows, seq_len + 1] view of the stream's first num_rows * (seq_len + 1) tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    rows = len(tokens) // (seq_len + 1)
    return tokens[: rows * (seq_len + 1)].view(rows, seq_len + 1)


def inputs_targets(rows: torch.Tensor, label_rows: Optional[torch.Tensor] = None,
                   task_rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """int64 (inputs [B, seq_len], targets [B, seq_len]) of packed rows [B, seq_len + 1], plus the inputs' task ids
    [B, seq_len] when task rows are given; targets come from the label rows when given (instruction data:
    IGNORE_INDEX where the loss does not count)."""
    rows = rows.long()
    targets = (rows if label_rows is None else label_rows.long())[:, 1:]
    batch = (rows[:, :-1].contiguous(), targets.contiguous())
    return batch if task_rows is None else (*batch, task_rows[:, :-1].long().contiguous())
