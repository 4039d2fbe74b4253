"""`build_data`: DataConfig -> tokenizer + training loader + validation batches for one dp rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moe_train.config.data import DataConfig, validate_data_config
from moe_train.data.chat import chat_streams
from moe_train.data.loader import TokenLoader, ValidationBatches
from moe_train.data.packing import encode_documents, split_stream
from moe_train.data.sources import iter_documents
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer


@dataclass
class DataBundle:
    """What the trainer needs from the data package. `vocab_size` is the minimum model vocab size."""

    tokenizer: ByteTokenizer | HFTokenizer
    train: TokenLoader  # the Trainer wraps it in a data.device.DevicePrefetcher (same interface)
    val: ValidationBatches
    num_train_tokens: int
    num_val_tokens: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_token_stream(cfg: DataConfig, tokenizer) -> torch.Tensor:
    """The whole int32 token stream of `cfg` (documents + separators, cut at cfg.max_tokens)."""
    return encode_documents(iter_documents(cfg), tokenizer, cfg.max_tokens)


def split_streams(cfg: DataConfig, tokenizer, say) -> tuple[torch.Tensor, ...]:
    """(train tokens, train labels or None, val tokens, val labels or None): text sources split the token stream
    (first 1 - val_fraction trains); chat splits records and masks the prompts (data/chat.py)."""
    if cfg.source == "chat":
        return chat_streams(cfg, tokenizer, say)
    train, val = split_stream(load_token_stream(cfg, tokenizer), cfg.val_fraction)
    return train, None, val, None


def build_data(cfg: DataConfig, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
               val_batches: Optional[int] = None, say: Callable[[str], None] = print) -> DataBundle:
    """Validate `cfg`, read and tokenize the source, split it and build this rank's loaders. Every rank reads the
    whole source (fine for the few-hundred-MB streams this targets); `val_batches` caps the validation batches
    (None = all full batches of this rank's share)."""
    validate_data_config(cfg)
    tokenizer = build_tokenizer(cfg)
    train_tokens, train_labels, val_tokens, val_labels = split_streams(cfg, tokenizer, say)
    train = TokenLoader(train_tokens, seq_len, micro_batch_size, cfg.seed, dp_rank, dp_size, train_labels)
    val = ValidationBatches(val_tokens, seq_len, micro_batch_size, dp_rank, dp_size, val_batches, val_labels)
    return DataBundle(tokenizer, train, val, len(train_tokens), len(val_tokens))
