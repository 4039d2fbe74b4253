"""`build_data`: DataConfig -> tokenizer + training loader + validation batches for one dp rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from moe_train.config.data import DataConfig, validate_data_config
from moe_train.data.chat import chat_streams
from moe_train.data.loader import TokenLoader, ValidationBatches
from moe_train.data.embedded import DOMAINS, embedded_documents
from moe_train.data.packing import Stream, domain_labels, encode_documents, split_stream
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
    task_names: Optional[list[str]] = None  # names of the batches' task ids, when they carry them

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_token_stream(cfg: DataConfig, tokenizer) -> torch.Tensor:
    """The whole int32 token stream of `cfg` (documents + separators, cut at cfg.max_tokens)."""
    return encode_documents(iter_documents(cfg), tokenizer, cfg.max_tokens)


def load_stream(cfg: DataConfig, tokenizer) -> tuple[Stream, Optional[list[str]]]:
    """The whole stream of a text source, with the domain of each token as its task (data.task_of_domain: the
    embedded corpus, generated once for both)."""
    if not cfg.task_of_domain:
        return Stream(load_token_stream(cfg, tokenizer)), None
    pairs = embedded_documents(cfg.embedded_size)
    tokens = encode_documents((text for _, text in pairs), tokenizer, cfg.max_tokens)
    tasks = domain_labels(pairs, tokenizer, DOMAINS)[:len(tokens)]
    return Stream(tokens, tasks=tasks.to(torch.int32)), list(DOMAINS)


def split_streams(cfg: DataConfig, tokenizer, say) -> tuple[Stream, Stream, Optional[list[str]]]:
    """(train, val, task names or None): text sources split the token stream (first 1 - val_fraction trains);
    chat splits records and masks the prompts (data/chat.py)."""
    if cfg.source == "chat":
        return chat_streams(cfg, tokenizer, say)
    stream, task_names = load_stream(cfg, tokenizer)
    n_train = len(split_stream(stream.tokens, cfg.val_fraction)[0])
    return stream.cut(0, n_train), stream.cut(n_train), task_names


def build_data(cfg: DataConfig, seq_len: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
               val_batches: Optional[int] = None, say: Callable[[str], None] = print) -> DataBundle:
    """Validate `cfg`, read and tokenize the source, split it and build this rank's loaders. Every rank reads the
    whole source (fine for the few-hundred-MB streams this targets); `val_batches` caps the validation batches
    (None = all full batches of this rank's share)."""
    validate_data_config(cfg)
    tokenizer = build_tokenizer(cfg)
    train_stream, val_stream, task_names = split_streams(cfg, tokenizer, say)
    train = TokenLoader(train_stream.tokens, seq_len, micro_batch_size, cfg.seed, dp_rank, dp_size,
                        train_stream.labels, train_stream.tasks)
    val = ValidationBatches(val_stream.tokens, seq_len, micro_batch_size, dp_rank, dp_size, val_batches,
                            val_stream.labels, val_stream.tasks)
    return DataBundle(tokenizer, train, val, len(train_stream.tokens), len(val_stream.tokens), task_names)
