"""Checkpoint files and sets on disk: durable writes, safe loads, manifests, verification.

The pieces ``largebatch.checkpoint.Checkpointer`` is built from, and what a tool needs to
inspect a checkpoint directory without a process group (``run_status``, ``list_sets``,
``verify_set``). Every load is ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from largebatch.checkpoint.meta import (  # noqa: F401 (re-exported)
    DONE, FORMAT, MANIFEST, TRAINER_FILE, CorruptSet, DoneMarker, OtherFormat, SetInfo,
    rank_file, read_set_info)
from largebatch.config import ConfigError
from largebatch.io import torch_bytes, write_bytes_atomic

_SET_NAME = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
# Keys that may change between a run and its resume: where things go and how long to train.
# Anything else means the checkpoint belongs to another experiment (see check_same_run).
RESUMABLE_CHANGES = ("checkpoint.", "log.", "study.", "data.root", "data.download",
                     "data.mirror", "data.num_workers", "train.max_steps", "train.epochs",
                     "train.time_budget_s", "train.device")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save one file so that a reader never sees it half-written (e.g. the final model.pt)."""
    return write_bytes_atomic(path, torch_bytes(state))


def _load_bytes(data: bytes, name: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file that would run code is refused, naming it."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"checkpoint file {name} refused: it holds pickled objects other than "
                          f"tensors and plain containers (weights_only load: {first})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"checkpoint file {name} is unreadable ({first})") from None


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint file safely: tensors and plain containers only (no pickled code)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"checkpoint file {path} is unreadable ({exc.strerror})") from None
    return _load_bytes(data, path, map_location)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- sets on disk ---------------------------------------------------------------------------
@dataclass
class CheckpointSet:
    """A published set: its directory, its order key and (once verified) its manifest."""

    path: Path
    step: int
    suffix: int
    info: Optional[SetInfo] = None

    @property
    def name(self) -> str:
        return self.path.name


def list_sets(directory: Path) -> list[CheckpointSet]:
    """Published sets in ``directory``, oldest first (by step, then suffix); none verified."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        m = _SET_NAME.match(child.name)
        if m and child.is_dir():
            found.append(CheckpointSet(child, int(m.group(1)), int(m.group(2) or 0)))
    return sorted(found, key=lambda s: (s.step, s.suffix))


def verify_set(path: Path) -> SetInfo:
    """Check set ``path``'s manifest and every file against it; returns the manifest.

    Raises:
        CorruptSet: naming the first invalid field or missing, truncated or altered file.
    """
    info = read_set_info(path)
    for name, entry in info.files.items():
        f = path / name
        if not f.is_file():
            raise CorruptSet(f"{f} is missing")
        if f.stat().st_size != entry.bytes or _sha256_file(f) != entry.sha256:
            raise CorruptSet(f"{f} does not match its sha256 in the manifest")
    return info


def run_status(directory: Path) -> dict[str, Any]:
    """What a (re)launch in ``directory`` would do, read from disk without loading a tensor.

    Returns:
        ``{"state": "finished"|"resumable"|"other_format"|"fresh", "step": int|None,
        "set": str|None}``: finished when the done marker names a set that is still complete,
        resumable when a complete set exists (the newest one), other_format when the newest
        readable set was written in another layout (a ``train`` would refuse it, so it is not
        resumable here), fresh otherwise. Used by the sbatch scripts to requeue only a run that
        has something left to do.
    """
    done = DoneMarker.read(directory)
    for found in reversed(list_sets(directory)):
        try:
            verify_set(found.path)
        except OtherFormat:
            return {"state": "other_format", "step": found.step, "set": found.name}
        except CorruptSet:
            continue
        state = "finished" if done is not None and done.set == found.name else "resumable"
        return {"state": state, "step": found.step, "set": found.name}
    return {"state": "fresh", "step": None, "set": None}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_same_run(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse to auto-resume a set written with another configuration (another experiment).

    Only the keys in ``RESUMABLE_CHANGES`` may differ (paths, logging, how long to train).
    Keys known to only one side (added or removed by a code update) are not compared.
    """
    # Through JSON, as the manifest stored it: tuples and lists compare equal.
    a = _flat(json.loads(json.dumps(saved, default=str)))
    b = _flat(json.loads(json.dumps(current, default=str)))
    diff = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]
            and not any(k == p or (p.endswith(".") and k.startswith(p))
                        for p in RESUMABLE_CHANGES)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:3])
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ConfigError(f"checkpoint.resume=auto: {where} was written by another configuration "
                          f"({shown}{more}); use another log.out_dir/checkpoint.dir, or "
                          f"checkpoint.resume=PATH from a fresh directory to branch off it")


def check_fresh(directory: Path) -> None:
    """checkpoint.resume=never must not leave an earlier run's sets to be resumed later."""
    sets = list_sets(directory)
    if sets or (directory / DONE).exists():
        what = f"checkpoint sets (newest {sets[-1].name})" if sets else DONE
        raise ConfigError(f"checkpoint.resume=never but {directory} holds an earlier run's "
                          f"{what}; remove that directory or use another log.out_dir / "
                          f"checkpoint.dir (or checkpoint.resume=auto to continue it)")


def _warn(message: str) -> None:
    print(f"largebatch: warning: {message}", file=sys.stderr, flush=True)


def _remove(path: Path) -> None:
    """Remove a temp or trash directory (never a published set: those are renamed first)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ---- the run's checkpointer ---------------------------------------------------------------
