"""Checkpoint files and sets on disk: durable writes, safe loads, manifests, verification.

The pieces ``largebatch.checkpoint.Checkpointer`` is built from, and what a tool needs to
inspect a checkpoint directory without a process group (``run_status``, ``list_sets``,
``verify_set``). Every load is ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from largebatch.config import ConfigError

FORMAT = 1
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
DONE = "done.json"
_SET_NAME = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
# Keys that may change between a run and its resume: where things go and how long to train.
# Anything else means the checkpoint belongs to another experiment (see check_same_run).
RESUMABLE_CHANGES = ("checkpoint.", "log.", "study.", "data.root", "data.download",
                     "data.mirror", "data.num_workers", "train.max_steps", "train.epochs",
                     "train.time_budget_s", "train.device")


def rank_file(rank: int) -> str:
    """Name of ``rank``'s file inside a set."""
    return f"rank-{rank:05d}.pt"


# ---- durable files --------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and fsync it; returns its sha256."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def write_json_durable(path: Path, obj: Any) -> None:
    """JSON to a temp file, fsynced, renamed into place, directory fsynced."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_durable(tmp, (json.dumps(obj, indent=2, default=str) + "\n").encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save one file so that a reader never sees it half-written (e.g. the final model.pt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_durable(tmp, _torch_bytes(state))
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


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


# ---- RNG streams ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This rank's RNG streams: Python, torch CPU, CUDA (when in use), numpy (when loaded)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        # As tensors and ints: a weights_only load refuses numpy arrays.
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["gauss"]))


# ---- sets on disk ---------------------------------------------------------------------------
class CorruptSet(Exception):
    """A set that cannot be used; the message names the offending file."""


@dataclass
class CheckpointSet:
    """A published set: its directory, its order key and (once verified) its manifest."""

    path: Path
    step: int
    suffix: int
    manifest: Optional[dict[str, Any]] = None

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


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of set ``path``; CorruptSet naming the file when missing or unreadable."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptSet(f"{path / MANIFEST} is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptSet(f"{path / MANIFEST} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptSet(f"{path / MANIFEST} is not a format-{FORMAT} manifest")
    return manifest


def verify_set(path: Path) -> dict[str, Any]:
    """Check every file of set ``path`` against its manifest; returns the manifest.

    Raises:
        CorruptSet: naming the first missing, truncated or altered file.
    """
    manifest = read_manifest(path)
    expected = {TRAINER_FILE, *(rank_file(r) for r in range(manifest["world_size"]))}
    missing = expected - set(manifest["files"])
    if missing:
        raise CorruptSet(f"{path / MANIFEST} lists no {sorted(missing)[0]}")
    for name, meta in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CorruptSet(f"{f} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256_file(f) != meta["sha256"]:
            raise CorruptSet(f"{f} does not match its sha256 in the manifest")
    return manifest


def run_status(directory: Path) -> dict[str, Any]:
    """What a (re)launch in ``directory`` would do, read from disk without loading a tensor.

    Returns:
        ``{"state": "finished"|"resumable"|"fresh", "step": int|None, "set": str|None}``:
        finished when the done marker names a set that is still complete, resumable when a
        complete set exists (the newest one), fresh otherwise. Used by the sbatch scripts to
        requeue only a run that has something left to do.
    """
    done = None
    try:
        done = json.loads((directory / DONE).read_text())
    except (OSError, ValueError):
        pass
    for found in reversed(list_sets(directory)):
        try:
            verify_set(found.path)
        except CorruptSet:
            continue
        state = "finished" if done and done.get("set") == found.name else "resumable"
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
