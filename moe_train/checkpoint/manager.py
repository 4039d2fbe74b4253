"""Save, verify, choose and load checkpoints of a run: `<run dir>/checkpoints/step_XXXXXXXX/`.

A checkpoint directory holds `manifest.json` (format version, layout, resolved config, trainer state, the index of
every tensor chunk, and each file's size and SHA-256) and one `rankNNNNN.safetensors` per rank (its chunks and RNG
states). Nothing is ever unpickled.

Atomicity: ranks write into `step_XXXXXXXX.partial/`; rank 0 writes the manifest last, renames the directory into
place and only then moves `latest` and deletes checkpoints beyond `keep_last`. A kill at any moment leaves every
earlier complete checkpoint untouched; a leftover `.partial` directory is never loaded and is removed by the next
save.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from moe_train.checkpoint.storage import (fsync_path, read_json, sha256_file, shard_metadata, write_atomic, write_json,
                                          write_shard)

FORMAT, VERSION = "moe_train.checkpoint", 1
MANIFEST, LATEST, PARTIAL, DELETING = "manifest.json", "latest", ".partial", ".deleting"
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def shard_name(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root` (renamed into place, with a manifest), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), reverse=True)


# -- verification ---------------------------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint directory: {MANIFEST} is missing")
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
                              f"is not readable by this moe_train; allowed: {FORMAT!r} version {VERSION}")
    return manifest


def verify_file(directory: Path, name: str, expected: dict, checkpoint_id: str) -> None:
    """Size, then the shard's own checkpoint id (catches a manifest from another checkpoint), then SHA-256."""
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    size = path.stat().st_size
    if size != expected["size"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes, the manifest says {expected['size']} "
                              f"(truncated or replaced)")
    try:
        owner = shard_metadata(path).get("checkpoint_id")
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint file {path} has a damaged header: {exc}") from None
    if owner != checkpoint_id:
        raise CheckpointError(f"checkpoint file {path} belongs to checkpoint {owner!r}, but {directory / MANIFEST} "
                              f"describes checkpoint {checkpoint_id!r}: the manifest comes from another run or step")
    if sha256_file(path) != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {path} does not match its SHA-256 in the manifest (altered)")


def verify(directory: Path, rank: int = 0, world: int = 1) -> dict:
    """The manifest, after checking this rank's share of the files (file i is checked by rank i % world)."""
    manifest = read_manifest(directory)
    for i, (name, expected) in enumerate(sorted(manifest["files"].items())):
        if i % world == rank:
            verify_file(directory, name, expected, manifest["checkpoint_id"])
    return manifest


def verify_everywhere(directory: Path, distributed: bool) -> dict:
    """Collective: verify with the files spread over the ranks; every rank raises the first error found."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    try:
        manifest, error = verify(directory, rank, world), None
    except CheckpointError as exc:
        manifest, error = None, str(exc)
    errors = [error]
    if distributed:
        errors = [None] * world
        dist.all_gather_object(errors, error)  # collective
    first = next((e for e in errors if e), None)
    if first:
        raise CheckpointError(first)
    return manifest


# -- choosing what to resume --------------------------------------------------------------------------------------
def choose(resume: str, root: Path, distributed: bool, say: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """Collective. `none`: None. A path: that checkpoint, verified, or an error. `auto`: the newest complete
    checkpoint that verifies, falling back (and saying so) past broken ones; None if there is none at all."""
    if resume == "none":
        return None
    if resume != "auto":
        return Path(resume), verify_everywhere(Path(resume), distributed)
    candidates, problems = complete_checkpoints(root), []
    for directory in candidates:
        try:
            manifest = verify_everywhere(directory, distributed)
        except CheckpointError as exc:
            problems.append(str(exc))
            say(f"checkpoint {directory.name} is unusable: {exc}; falling back to the previous one")
            continue
        return directory, manifest
    if problems:
        raise CheckpointError(f"checkpoint.resume=auto: no usable checkpoint in {root}: " + "; ".join(problems))
    say(f"checkpoint.resume=auto: no checkpoint in {root}, starting from step 0")
    return None


# -- saving ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SaveRequest:
    """What one rank contributes to a checkpoint, and what rank 0 adds to the manifest."""

    step: int
    tensors: dict[str, torch.Tensor]  # chunk key -> tensor (model, optimizer, RNG)
    fragment: dict  # {"index": tensor key -> entry, "scalars": ..., "rng": [keys]}
    manifest_extra: dict  # rank 0's: layout, config, trainer state


def save(root: Path, request: SaveRequest, rank: int, distributed: bool, keep_last: int) -> Path:
    """Collective. Write the checkpoint of `request.step` atomically; returns its final directory."""
    final = root / step_dir_name(request.step)
    partial = final.with_name(final.name + PARTIAL)
    checkpoint_id = prepare_partial(partial, rank, distributed)  # collective
    file = shard_name(rank)
    info = write_shard(partial / file, request.tensors, {"checkpoint_id": checkpoint_id, "step": str(request.step),
                                                         "rank": str(rank)})
    mine = {**request.fragment, "rank": rank, "file": file, "info": info}
    fragments = [mine]
    if distributed:
        fragments = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, fragments, dst=0)  # collective
    if rank == 0:
        manifest = build_manifest(request, checkpoint_id, fragments)
        publish(partial, final, manifest)
        prune(root, keep_last)
    if distributed:
        dist.barrier()  # collective: the checkpoint is complete on return, on every rank
    return final


def prepare_partial(partial: Path, rank: int, distributed: bool) -> str:
    """Rank 0 clears a stale partial directory and creates a fresh one; every rank learns the checkpoint id."""
    box = [None]
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        box = [uuid.uuid4().hex]
    if distributed:
        dist.broadcast_object_list(box, src=0)  # collective (also orders the mkdir before any write)
    return box[0]


def build_manifest(request: SaveRequest, checkpoint_id: str, fragments: list[dict]) -> dict:
    tensors, scalars, files, rng = {}, {}, {}, {}
    for frag in sorted(fragments, key=lambda f: f["rank"]):
        files[frag["file"]] = frag["info"]
        rng[str(frag["rank"])] = {"file": frag["file"], "keys": frag["rng"]}
        scalars.update(frag["scalars"])
        for key, entry in frag["index"].items():
            merged = tensors.setdefault(key, {**entry, "chunks": []})
            merged["chunks"].extend(entry["chunks"])
    return {"format": FORMAT, "version": VERSION, "checkpoint_id": checkpoint_id, "step": request.step,
            **request.manifest_extra, "tensors": tensors, "optimizer_scalars": scalars, "rng": rng, "files": files}


def publish(partial: Path, final: Path, manifest: dict) -> None:
    """Manifest last, then the rename, then `latest`: each step is atomic and durable."""
    write_json(partial / MANIFEST, manifest)  # fsyncs the file and `partial`
    if final.exists():  # re-saving a step (a run resumed from an older checkpoint): replace it whole
        stale = final.with_name(final.name + DELETING)
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(partial, final)
        shutil.rmtree(stale)
    else:
        os.rename(partial, final)
    fsync_path(final.parent)
    write_atomic(final.parent / LATEST, final.name + "\n")


def prune(root: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and leftover partial directories."""
    for old in complete_checkpoints(root)[keep_last:]:
        doomed = old.with_name(old.name + DELETING)
        os.rename(old, doomed)  # atomic: never a half-deleted directory that still looks complete
        shutil.rmtree(doomed)
    for leftover in [*root.glob(f"step_*{PARTIAL}"), *root.glob(f"step_*{DELETING}")]:
        shutil.rmtree(leftover, ignore_errors=True)
