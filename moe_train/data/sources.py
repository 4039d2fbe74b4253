"""Document sources: each turns a DataConfig into an iterator of document strings.

embedded  generated in-process (moe_train.data.embedded)
text      one local text file through `datasets`' "text" builder with sample_by="document": the whole file is one
          document, so its bytes are kept exactly and "first 90% / last 10%" is a split of the file itself
hf        `datasets.load_dataset(name, split, streaming)` for hub names; `datasets.load_from_disk` for directories
          written by save_to_disk; the "json" builder for local .json/.jsonl files. Local paths never touch the network.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from moe_train.config.data import DataConfig
from moe_train.data.embedded import embedded_documents

BATCH_ROWS = 1024  # rows fetched per Arrow batch while iterating a dataset
JSON_SUFFIXES = (".json", ".jsonl")


def text_documents(cfg: DataConfig) -> Iterator[str]:
    """The text file `cfg.path` as one document (ValueError if it is missing or empty)."""
    import datasets

    path = cfg.path
    if not path or not os.path.isfile(path):
        raise ValueError(f"data.path={path!r} does not exist or is not a file; data.source='text' needs a local "
                         "text file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"data.path={path!r} is empty; data.source='text' needs a non-empty text file")
    ds = datasets.load_dataset("text", data_files={"train": path}, split="train", sample_by="document",
                               streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    return column_texts(ds, "text")


def _is_saved_to_disk(path: str) -> bool:
    names = ("state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def _load_from_disk(path: str, cfg: DataConfig):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise ValueError(f"data.split={cfg.split!r} is not in the dataset saved at {path!r}; "
                             f"available splits: {sorted(ds)}")
        ds = ds[cfg.split]
    return ds.to_iterable_dataset() if cfg.streaming else ds


def _load_json(path: str, cfg: DataConfig):
    import datasets

    return datasets.load_dataset("json", data_files={cfg.split: path}, split=cfg.split, streaming=cfg.streaming,
                                 cache_dir=cfg.cache_dir)


def _open_local(location: str, cfg: DataConfig):
    """A save_to_disk directory or a .json/.jsonl file; None when `location` is neither."""
    if _is_saved_to_disk(location):
        return _load_from_disk(location, cfg)
    if os.path.isfile(location) and location.endswith(JSON_SUFFIXES):
        return _load_json(location, cfg)
    return None


def open_hf_dataset(cfg: DataConfig):
    """The Dataset / IterableDataset selected by cfg.path (local) or cfg.name (local or hub)."""
    import datasets

    if cfg.path:
        ds = _open_local(cfg.path, cfg)
        if ds is None:
            raise ValueError(f"data.path={cfg.path!r} is not a save_to_disk directory or an existing .json/.jsonl "
                             "file; use data.name for hub datasets or other local formats")
        return ds
    ds = _open_local(cfg.name, cfg)
    if ds is not None:
        return ds
    return datasets.load_dataset(cfg.name, split=cfg.split, streaming=cfg.streaming, cache_dir=cfg.cache_dir)


def _check_field(columns: Iterable[str], field: str) -> None:
    if field not in columns:
        raise ValueError(f"data.text_field={field!r} is not a column of the dataset; available columns: "
                         f"{sorted(columns)}")


def column_texts(ds, field: str) -> Iterator[str]:
    """The non-empty strings of column `field`, in order, read in Arrow batches. The column is checked before the
    first read when the schema is known (streaming JSON learns it from the first batch)."""
    if ds.column_names is not None:
        _check_field(ds.column_names, field)
    return _iter_column(ds, field)


def _iter_column(ds, field: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=BATCH_ROWS):
        _check_field(batch.keys(), field)
        yield from (text for text in batch[field] if text)


def hf_documents(cfg: DataConfig) -> Iterator[str]:
    return column_texts(open_hf_dataset(cfg), cfg.text_field)


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """The documents of `cfg.source`, in a fixed order."""
    if cfg.source == "embedded":
        return iter([text for _, text in embedded_documents(cfg.embedded_size)])
    if cfg.source == "text":
        return text_documents(cfg)
    if cfg.source == "hf":
        return hf_documents(cfg)
    raise ValueError(f"data.source={cfg.source!r} is not supported; allowed: 'embedded', 'text', 'hf'")
