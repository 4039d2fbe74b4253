"""Files of a checkpoint: safetensors shards (tensors only, never pickles) and JSON, written durably and hashed.

Durability: every file is flushed and fsync'ed before the directory that holds it is renamed into place, and the
directory itself is fsync'ed after the rename, so a power cut or `kill -9` leaves either the old state or the new.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_train.checkpoint.placement import overlap

HASH_BLOCK = 1 << 22  # 4 MiB reads while hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write one safetensors file durably; return its {size, sha256} for the manifest. Cost: one copy of the
    tensors to host memory and one read back for the hash."""
    host = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
    save_file(host, str(path), metadata=metadata)
    fsync_path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, atomic rename, fsync of the directory (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def shard_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors header (reads the header only)."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


class ChunkReader:
    """Reads regions of global tensors out of a checkpoint's shards (lazily: only the overlapping slices)."""

    def __init__(self, directory: Path, tensors_index: dict):
        self.directory, self.index = directory, tensors_index
        self.handles: dict[str, object] = {}

    def handle(self, file: str):
        if file not in self.handles:
            self.handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self.handles[file]

    def read_into(self, key: str, out: torch.Tensor, offsets: tuple[int, ...]) -> None:
        """Fill `out`, the region at `offsets` of global tensor `key`, from every saved chunk it overlaps."""
        entry = self.index.get(key)
        if entry is None:
            raise KeyError(key)
        covered = 0
        for chunk in entry["chunks"]:
            hit = overlap(offsets, out.shape, chunk["offsets"], chunk["shape"])
            if hit is None:
                continue
            into_out, into_chunk = hit
            piece = self.handle(chunk["file"]).get_slice(chunk["key"])[into_chunk]
            out[into_out].copy_(piece)
            covered += out[into_out].numel()
        if covered != out.numel():
            raise ValueError(f"checkpoint tensor {key!r} covers {covered} of the {out.numel()} elements this rank "
                             f"needs at offsets {list(offsets)}: its chunks are incomplete")

    def dtype_of(self, key: str) -> torch.dtype:
        """The stored dtype of global tensor `key` (read from its first chunk's header)."""
        first = self.index[key]["chunks"][0]
        return _dtype(self.handle(first["file"]).get_slice(first["key"]).get_dtype())

    def read_full(self, key: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        out = torch.empty(self.index[key]["global_shape"], dtype=dtype or self.dtype_of(key))
        self.read_into(key, out, (0,) * out.dim())
        return out


def _dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    if name not in table:
        raise ValueError(f"unsupported tensor dtype {name!r} in checkpoint; allowed: {', '.join(table)}")
    return table[name]
