"""Training data: sources -> tokenizer -> one token stream -> train/val split -> packed, dp-sharded batches.

Entry point for the trainer::

    bundle = build_data(cfg.data, seq_len=256, micro_batch_size=8, dp_rank=r, dp_size=d, val_batches=20)
    assert model_vocab_size >= bundle.vocab_size
    inputs, targets, *task_ids = bundle.train.next_batch()  # int64 [8, 256] each; targets = inputs shifted by one
    for inputs, targets, *task_ids in bundle.val: ...  # the same fixed batches on every eval
    # task_ids ([8, 256], each token's task) when the data has tasks: chat records' "task", or data.task_of_domain;
    # bundle.task_names names them
    state = bundle.train.state_dict()                  # plain ints; bundle.train.load_state_dict(state) resumes

Modules:
    tokenizer  ByteTokenizer (256 ids, byte 0 separates documents), HFTokenizer (tokenizer.json), build_tokenizer
    embedded   embedded_documents(size) -> [(domain, text)], DOMAINS: the generated six-domain corpus
    sources    iter_documents(cfg): embedded | text (a local file) | hf (hub, save_to_disk dir, .json/.jsonl)
    packing    encode_documents, split_stream, pack_sequences, domain_labels (per-token domain for analyses)
    loader     TokenLoader (shuffled, infinite, resumable, dp-sharded), ValidationBatches
    build      build_data -> DataBundle(tokenizer, train, val, num_train_tokens, num_val_tokens)
"""

from moe_train.data.build import DataBundle, build_data, load_token_stream
from moe_train.data.embedded import DOMAINS, embedded_documents
from moe_train.data.loader import TokenLoader, ValidationBatches
from moe_train.data.packing import domain_labels, encode_documents, pack_sequences, split_stream
from moe_train.data.sources import iter_documents
from moe_train.data.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, load_hf_tokenizer

__all__ = [
    "DOMAINS", "ByteTokenizer", "DataBundle", "HFTokenizer", "TokenLoader", "ValidationBatches", "build_data",
    "build_tokenizer", "domain_labels", "embedded_documents", "encode_documents", "iter_documents",
    "load_hf_tokenizer", "load_token_stream", "pack_sequences", "split_stream",
]
