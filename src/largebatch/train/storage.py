"""Storage checked before the first step, and one run per output folder.

A run's output folder (``log.out_dir``) and checkpoint folder (``checkpoint.dir``) used to be
found unusable only at the first save, after the compute was spent, as a traceback. Before
anything is written, rank 0 now

* **locks** ``log.out_dir`` (``claim_output``): ``fcntl.flock`` on ``.largebatch.lock``, held
  for the run (the process's lifetime under the CLI). The kernel drops the lock when the
  holder dies, however it dies, so a killed run never leaves it stale; the file only says
  who holds it (pid, host, since when) for the error line of a second run;
* **probes** each folder (``check_storage``): creates it, writes, fsyncs and removes a probe
  file: a folder that is a file, lies under a file, is not writable or is on a read-only
  filesystem is refused in one line naming its key;
* **checks the free space** against what the run will hold at once (``needed_bytes``).

Every verdict is rank 0's and reaches every rank in one broadcast (``_agree``), so a refusal
is the same one line on every rank, exit 2, and no rank is left waiting in a collective.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as torch_dist

from largebatch.errors import ConfigError

#: The lock file in ``log.out_dir`` (hidden: listings of a run's files skip it).
LOCK_NAME = ".largebatch.lock"
#: A checkpoint set is estimated at this many times the parameters' bytes: the weights (1x)
#: plus the optimizer's state, which is at most two tensors per parameter for the optimizers
#: largebatch builds (SGD momentum 1x, Adam/AdamW/LAMB moments 2x, LARS 1x); RNG streams,
#: counters and the manifest are small beside them.
SET_FACTOR = 3
#: Folders locked by this process: resolved path -> [fd, holds] (a process that trains twice
#: into one folder, e.g. the study or a test calling ``train`` again, does not lock itself out).
_HELD: dict[str, list[int]] = {}

MB = 1e6


class OutputLock:
    """The lock on one output folder, held until ``release`` (or the process's death)."""

    def __init__(self, key: Optional[str]) -> None:
        self.key = key  # None: nothing held (not rank 0)

    def release(self) -> None:
        """Drop this hold; the last one closes the file, which releases the ``flock``."""
        key, self.key = self.key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])


def _holder(fd: int) -> str:
    """Who holds the lock, from the file it wrote (pid, host, since), in words."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def lock_folder(folder: Path, field: str = "log.out_dir") -> OutputLock:
    """Take the exclusive lock on ``folder`` (created if needed) for this process.

    Raises:
        ConfigError: another process holds it (naming the folder and the holder's pid), or
            the folder cannot be created or written.
    """
    probe_folder(folder, field)
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        return OutputLock(key)
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"{field}={folder}: cannot open its lock file {LOCK_NAME} "
                          f"({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(f"{field}={folder} is in use by another run ({holder}); wait for "
                          f"it to end or use another {field}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.time()}).encode(), 0)
    _HELD[key] = [fd, 1]
    return OutputLock(key)


def probe_folder(folder: Path, field: str) -> None:
    """Create ``folder`` and write, fsync and remove a probe file in it.

    Raises:
        ConfigError: naming ``field``: the folder is a file, lies under a file, cannot be
            created, or a file in it cannot be written (permissions, a read-only filesystem).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{field}={folder} is a file, not a folder") from None
    except OSError as exc:
        raise ConfigError(f"{field}={folder} cannot be created ({exc.strerror})") from None
    probe = folder / f".largebatch-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{field}={folder} is not writable ({exc.strerror}); the run "
                          f"writes its files there") from None


def param_bytes(params: Iterable[torch.Tensor], sharded: Iterable[torch.Tensor] = (),
                world_size: int = 1) -> int:
    """Bytes of the model's parameters: the replicated ones (ZeRO-3's whole size,
    ``ds_numel``, not this rank's partition) and ``world_size`` times this rank's sharded
    ones (every rank's shard goes into a set)."""
    def size(p: torch.Tensor) -> int:
        return int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return sum(map(size, params)) + world_size * sum(map(size, sharded))


def needed_bytes(params: int, keep: int, sets_present: int) -> int:
    """What the checkpoint folder holds at most at once: ``keep`` sets plus the one being
    written before the oldest is pruned (fewer new ones where complete sets are already
    there, as on a resume: they are replaced, not added to), each ``SET_FACTOR`` x the
    parameters' bytes."""
    return max(1, keep + 1 - min(sets_present, keep)) * SET_FACTOR * params


def check_space(folders: dict[str, tuple[Path, int]]) -> None:
    """Each ``field: (folder, bytes needed there)`` against its filesystem's free space;
    folders on one filesystem add up.

    Raises:
        ConfigError: naming the field, the free and the needed megabytes.
    """
    by_device: dict[int, list[tuple[str, Path, int]]] = {}
    for field, (folder, need) in folders.items():
        by_device.setdefault(os.stat(folder).st_dev, []).append((field, folder, need))
    for entries in by_device.values():
        field, folder, _ = entries[-1]  # the checkpoint folder when both share a disk
        need = sum(n for _, _, n in entries)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConfigError(
                f"{field}={folder} has {free / MB:.1f} MB free, the run needs about "
                f"{need / MB:.1f} MB (its checkpoint sets at {SET_FACTOR}x the parameters' "
                f"bytes for weights and optimizer state, and model.pt); free some space or "
                f"use another {field}")


def _agree(error: Optional[ConfigError], device: torch.device) -> None:
    """Collective: rank 0's verdict (``error``, None on the other ranks) becomes every rank's
    one line. A no-op verdict without a process group or with one rank."""
    message = None if error is None else str(error)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        box = [message]
        on_nccl = torch_dist.get_backend() == "nccl"
        torch_dist.broadcast_object_list(box, src=0, device=device if on_nccl else None)
        message = box[0]
    if message is not None:
        exc = ConfigError(message)
        exc.all_ranks = True  # every rank raises it: the CLI lets all print before exiting
        raise exc


def claim_output(out_dir: Path, is_main: bool, device: torch.device) -> OutputLock:
    """Collective: rank 0 locks ``log.out_dir``; every rank learns whether it could.

    Raises:
        ConfigError: on every rank, the same line (the folder in use, naming the holder's pid,
            or not usable).
    """
    lock, error = OutputLock(None), None
    if is_main:
        try:
            lock = lock_folder(out_dir)
        except ConfigError as exc:
            error = exc
    try:
        _agree(error, device)
    except BaseException:
        lock.release()
        raise
    return lock


def check_storage(folders: dict[str, tuple[Path, int]], is_main: bool,
                  device: torch.device) -> None:
    """Collective: rank 0 probes every ``field: (folder, bytes needed)`` (created, written,
    fsynced, removed) and checks the free space; every rank learns the verdict.

    Raises:
        ConfigError: on every rank, one line naming the field and the numbers.
    """
    error = None
    if is_main:
        try:
            for field, (folder, _) in folders.items():
                probe_folder(folder, field)
            check_space(folders)
        except ConfigError as exc:
            error = exc
    _agree(error, device)
