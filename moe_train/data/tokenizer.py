"""Tokenizers: raw UTF-8 bytes, or a HF `tokenizers` tokenizer.json.

Both expose `encode(str) -> list[int]`, `decode(list[int]) -> str`, `vocab_size` (the model's vocab must be at least
this) and `separator` (the ids put between documents when the stream is packed).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from tokenizers import Tokenizer

from moe_train.config.data import DataConfig

# Looked up in the vocabulary, in this order, when tokenizer_config.json names no eos token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>")
# Used between documents when the tokenizer has no eos token.
FALLBACK_SEPARATOR = "\n\n"


class ByteTokenizer:
    """Token id = one byte of the UTF-8 encoding, vocab 256. Byte 0 (NUL, absent from ordinary text) is the document
    separator, so a byte model needs no extra id."""

    vocab_size = 256
    eos_id = 0

    @property
    def separator(self) -> list[int]:
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from tokenizer.json. Encodes without the post-processor's special tokens
    (no BOS/CLS per document): the only special id in the stream is the separator."""

    def __init__(self, tokenizer: Tokenizer, eos_id: Optional[int]):
        self._tok = tokenizer
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def separator(self) -> list[int]:
        """[eos_id] when the vocabulary has an eos token, else the encoding of a blank line."""
        return [self.eos_id] if self.eos_id is not None else self.encode(FALLBACK_SEPARATOR)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _tokenizer_file(path: str) -> str:
    allowed = "'byte', a tokenizer.json file, or a directory containing tokenizer.json"
    if os.path.isdir(path):
        candidate = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(candidate):
            raise ValueError(f"data.tokenizer={path!r} is a directory without tokenizer.json; allowed: {allowed}")
        return candidate
    if not os.path.isfile(path):
        raise ValueError(f"data.tokenizer={path!r} does not exist; allowed: {allowed}")
    return path


def _configured_eos(directory: str) -> Optional[str]:
    """The eos token named in a transformers-style tokenizer_config.json next to tokenizer.json, if any."""
    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config, encoding="utf-8") as f:
        eos = json.load(f).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _find_eos(tok: Tokenizer, directory: str) -> Optional[int]:
    configured = _configured_eos(directory)
    for token in ((configured,) if configured else ()) + EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def load_hf_tokenizer(path: str) -> HFTokenizer:
    """Load tokenizer.json (`path` is the file or its directory); ValueError naming data.tokenizer if unusable."""
    file = _tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"data.tokenizer={path!r}: {file} is not a valid tokenizer.json ({e})") from e
    return HFTokenizer(tok, _find_eos(tok, os.path.dirname(os.path.abspath(file))))


def build_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    """From `cfg.tokenizer`: "byte" or a path to tokenizer.json / its directory."""
    return ByteTokenizer() if cfg.tokenizer == "byte" else load_hf_tokenizer(cfg.tokenizer)
