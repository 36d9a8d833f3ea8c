"""Rank 0's half of writing a set: the manifest and the one rename that publishes it, the
pruning to ``checkpoint.keep``, and the one line a failed write ends in.

A set is visible only once complete (``publish_set`` renames its temp directory), so a write
that fails at any point (a full disk, a folder gone read-only, a file size limit) leaves every
earlier set as it was; ``save_failed`` removes the temp directory to give its space back.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from largebatch.checkpoint.meta import MANIFEST, TRAINER_FILE, FileEntry, SetInfo, rank_file
from largebatch.checkpoint.store import _remove, _sha256_file, list_sets
from largebatch.config import ConfigError
from largebatch.errors import StorageError
from largebatch.io import fsync_dir, json_text, write_durable


def publish_set(tmp: Path, directory: Path, step: int, world_size: int,
                config: dict[str, Any], facts: dict[str, Any]) -> Path:
    """Rank 0: the manifest with every file's sha256, then one rename makes the set visible.

    Returns:
        The set's directory (``step-N``, or ``step-N.K`` when that step has a set already).

    Raises:
        ConfigError: a rank's file is missing (``directory`` is not one shared filesystem).
        OSError: a write, fsync or rename failed.
    """
    files = {}
    for name in (TRAINER_FILE, *(rank_file(r) for r in range(world_size))):
        f = tmp / name
        if not f.is_file():  # every rank passed the barrier: it wrote elsewhere
            raise ConfigError(f"checkpoint: {f} is missing after its rank wrote it; "
                              f"checkpoint.dir={directory} must be one filesystem "
                              f"that every rank sees (a shared path across nodes)")
        files[name] = FileEntry(_sha256_file(f), f.stat().st_size)
    info = SetInfo(step=step, world_size=world_size, epoch=int(facts["epoch"]),
                   consumed=int(facts["consumed"]), files=files, config=config,
                   plan=facts.get("plan"), created_unix=time.time(), torch=torch.__version__)
    write_durable(tmp / MANIFEST, json_text(info.to_json()).encode())
    fsync_dir(tmp)
    target = directory / f"step-{step:06d}"
    suffix = 0
    while target.exists():  # the same step saved again: never overwrite a complete set
        suffix += 1
        target = directory / f"step-{step:06d}.{suffix}"
    os.rename(tmp, target)
    fsync_dir(directory)
    return target


def prune_sets(directory: Path, keep: int) -> None:
    """Rank 0, after a set is complete: keep the newest ``keep`` sets."""
    for old in list_sets(directory)[:-keep]:
        trash = directory / f".{old.name}.trash"
        os.rename(old.path, trash)  # out of the set namespace first: a kill mid-delete
        shutil.rmtree(trash, ignore_errors=True)  # leaves no half set to resume from
    fsync_dir(directory)


def save_failed(directory: Path, tmp: Path, step: int, rank: int,
                error: Optional[BaseException]) -> StorageError:
    """The one line of a failed save (``error``: this rank's, None when another rank's write
    failed); rank 0 removes the temp set first. Returned for every rank to raise."""
    if rank == 0:
        _remove(tmp)
    if isinstance(error, OSError):
        why = f"{error.strerror or error} ({error.filename or tmp})"
    else:
        why = str(error) if error is not None else "another rank's write failed"
    stop = StorageError(f"checkpoint.dir={directory}: saving the set of step {step} failed "
                        f"on rank {rank}: {why}; every earlier complete set is intact (a "
                        f"relaunch resumes from the newest)")
    stop.all_ranks = True  # every rank raises it: the CLI lets all print before exiting
    return stop
