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
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from largebatch.checkpoint.meta import (  # noqa: F401 (re-exported)
    DONE, FORMAT, MANIFEST, SET_NAME, TRAINER_FILE, CorruptSet, DoneMarker, OtherFormat,
    SetInfo, rank_file, read_set_info)
from largebatch.config import ConfigError
from largebatch.io import torch_bytes, write_bytes_atomic

_SET_NAME = SET_NAME
# Keys that may change between a run and its resume: where things go and how long to train.
# Anything else means the checkpoint belongs to another experiment (see check_same_run).
RESUMABLE_CHANGES = ("checkpoint.", "log.", "study.", "data.root", "data.download",
                     "data.mirror", "data.num_workers", "train.max_steps", "train.epochs",
                     "train.time_budget_s", "train.device")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Save one file so that a reader never sees it half-written (e.g. the final model.pt)."""
    return write_bytes_atomic(path, torch_bytes(state))


class Unreadable(ConfigError):
    """A checkpoint file that is not a torch file (truncated, garbage): in a set, corrupt."""


def _load_bytes(data: bytes, name: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``; a file that would run code is refused, naming it.

    Raises:
        ConfigError: the file holds pickled objects other than tensors and containers.
        Unreadable: it is not a readable torch file.
    """
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError(f"checkpoint file {name} refused: it holds pickled objects other than "
                          f"tensors and plain containers (weights_only load: {first})") from None
    except Exception as exc:  # noqa: BLE001 (zip, pickle and storage errors of a bad file)
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise Unreadable(f"checkpoint file {name} is unreadable ({first})") from None


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

    Besides the manifest's schema (``meta``): every listed file is a regular file of the
    listed size and sha256, and the set holds no other ``*.pt`` file (an unlisted rank file
    means the manifest's world size was changed).

    Raises:
        CorruptSet: naming the first invalid field or missing, truncated, altered or
            unlisted ``.pt`` file.
    """
    info = read_set_info(path)
    for name, entry in info.files.items():
        f = path / name
        try:
            st = os.stat(f)
        except OSError:
            raise CorruptSet(f"{f} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise CorruptSet(f"{f} is not a regular file")
        if st.st_size != entry.bytes or _sha256_file(f) != entry.sha256:
            raise CorruptSet(f"{f} does not match its sha256 in the manifest")
    with os.scandir(path) as entries:  # stray non-checkpoint files (.nfs*, ...) are ignored
        for child in entries:
            if child.name.endswith(".pt") and child.name not in info.files:
                raise CorruptSet(f"{path / child.name} is not listed in {path / MANIFEST} "
                                 f"(world_size {info.world_size})")
    return info


def final_weights_problem(path: Path) -> str:
    """'' when ``path`` (a run's ``model.pt``) is a regular file that loads with
    ``weights_only`` (memory-mapped: nothing is copied into memory) as ``{"model": {name:
    tensor}}``; else why not, in a few words. Never raises."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path} is not a regular file"
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        return f"{path} is missing"
    except Exception as exc:  # noqa: BLE001 (any failure to load is the answer)
        return f"{path} does not load ({_first_line(exc)})"
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
        return f"{path} holds no model state_dict"
    return ""


def _first_line(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_status(directory: Path, final_weights: Optional[Path] = None) -> dict[str, Any]:
    """What a (re)launch in ``directory`` would do, read from disk; never raises.

    Args:
        directory: the run's checkpoint directory.
        final_weights: the run's ``model.pt`` (``log.out_dir/model.pt``); when given, a run
            is finished only if it loads.

    Returns:
        ``{"state": ..., "step": int|None, "set": str|None, "note": str}`` with state
        ``finished`` (the done marker passes its schema and names the newest complete set,
        and the final weights load), ``resumable`` (a complete set exists: the newest one;
        also a finished run whose final weights are missing or do not load: a relaunch
        writes them), ``other_format`` (the newest readable set was written in another
        layout: a ``train`` would refuse it), ``fresh`` (no complete set), or ``unreadable``
        (the directory itself cannot be read). ``note`` says what was skipped and why ('' if
        nothing). Used by the sbatch scripts to requeue only a run that has something left
        to do. Bounded: each set's manifest is read once within ``meta``'s limits, every
        listed file hashed once.
    """
    try:
        return _status(Path(directory), final_weights)
    except Exception as exc:  # noqa: BLE001 (status answers, whatever the disk holds)
        return {"state": "unreadable", "step": None, "set": None,
                "note": f"{directory}: {_first_line(exc)}"}


def _status(directory: Path, final_weights: Optional[Path]) -> dict[str, Any]:
    done, why = DoneMarker.check(directory)
    notes = [f"done marker ignored ({why})"] if why else []
    for found in reversed(list_sets(directory)):
        try:
            verify_set(found.path)
        except OtherFormat as exc:
            notes.append(str(exc))
            return _answer("other_format", found, notes)
        except CorruptSet as exc:
            notes.append(f"{found.name} unusable ({exc})")
            continue
        if done is None or done.set != found.name:
            if done is not None:
                notes.append(f"{DONE} names {done.set}, not the newest complete set")
            return _answer("resumable", found, notes)
        problem = final_weights_problem(final_weights) if final_weights is not None else ""
        if problem:
            notes.append(f"finished but {problem}: a relaunch writes them")
            return _answer("resumable", found, notes)
        return _answer("finished", found, notes)
    return {"state": "fresh", "step": None, "set": None, "note": "; ".join(notes)}


def _answer(state: str, found: CheckpointSet, notes: list[str]) -> dict[str, Any]:
    return {"state": state, "step": found.step, "set": found.name,
            "note": "; ".join(notes).replace("\n", " ")}


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
    if a and b and not set(a) & set(b):  # nothing to compare is no proof of the same run
        raise ConfigError(f"checkpoint.resume=auto: {where} was written by a configuration "
                          f"that shares no key with this run's (e.g. {sorted(a)[0]!r}); use "
                          f"another log.out_dir/checkpoint.dir")
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


def check_payload(obj: Any, where: Path, names: Iterable[str], step: int,
                  rank: Optional[int] = None) -> dict[str, Any]:
    """Check what a set's file holds before any part sees it: ``{part name: state dict}``
    for each of ``names``; a rank file (``rank`` given) also its own rank, the set's step and
    an ``rng`` dict, and its parts' states may be None.

    Raises:
        CorruptSet: naming the file and the part (or field) of the wrong type or missing.
    """
    if not isinstance(obj, dict):
        raise CorruptSet(f"{where} holds {type(obj).__name__}, not {{part: state}}")
    if rank is not None:
        for key, want in (("rank", rank), ("step", step)):
            if obj.get(key) != want or isinstance(obj.get(key), bool):
                raise CorruptSet(f"{where} says {key}={repr(obj.get(key))[:60]}, not {want}")
        if not isinstance(obj.get("rng"), dict):
            raise CorruptSet(f"{where} part 'rng' is {type(obj.get('rng')).__name__}, "
                             f"not a dict")
    for name in names:
        if name not in obj:
            raise CorruptSet(f"{where} holds no part {name!r}")
        if not isinstance(obj[name], dict) and not (rank is not None and obj[name] is None):
            raise CorruptSet(f"{where} part {name!r} is {type(obj[name]).__name__}, not a "
                             f"state dict")
    return obj


def quarantine(path: Path) -> Path:
    """Rename a bad set out of the set namespace (``NAME.corrupt``, ``NAME.corrupt1``, ...);
    its files are kept for inspection. Returns the new path."""
    bad, n = path.with_name(f"{path.name}.corrupt"), 0
    while bad.exists():
        n += 1
        bad = path.with_name(f"{path.name}.corrupt{n}")
    os.rename(path, bad)
    return bad


def newest_valid(directory: Path, move: bool) -> Optional[CheckpointSet]:
    """Newest set of ``directory`` whose files all match the manifest; each bad one is named
    on stderr and (``move``: in the run's own directory) renamed out of the way, never
    deleted. A set of another format is refused in one line: not corrupt, only not ours.

    Raises:
        ConfigError: the newest readable set is of another format.
    """
    for s in reversed(list_sets(directory)):
        try:
            s.info = verify_set(s.path)
            return s
        except OtherFormat as exc:
            raise ConfigError(f"checkpoint: {exc}; resume it with the largebatch that "
                              f"wrote it, or use another log.out_dir / checkpoint.dir") \
                from None
        except CorruptSet as exc:
            moved = f", moved to {quarantine(s.path).name}" if move else ""
            _warn(f"checkpoint set {s.path} is unusable ({exc}){moved}; trying the "
                  f"previous set")
    return None


def read_set_file(found: CheckpointSet, name: str) -> Any:
    """File ``name`` of set ``found``: sha256-checked against the manifest, weights_only.

    Raises:
        CorruptSet: unreadable, changed since it was verified, or not a torch file.
        ConfigError: it holds pickled code (a hostile set is refused, never moved).
    """
    path = found.path / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptSet(f"{path} is unreadable ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != found.info.files[name].sha256:
        raise CorruptSet(f"{path} does not match its sha256 in the manifest")
    try:
        return _load_bytes(data, path)
    except Unreadable as exc:
        raise CorruptSet(str(exc)) from None


def _warn(message: str) -> None:
    print(f"largebatch: warning: {message}", file=sys.stderr, flush=True)


def _remove(path: Path) -> None:
    """Remove a temp or trash directory (never a published set: those are renamed first)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _load_part(where: Path, name: str, load: Callable[..., None], *state: Any,
               reshard: bool = False) -> None:
    """``load(*state)`` for part ``name`` of file ``where``; any failure is a corrupt set
    naming both, except a resharding part's ``ConfigError`` (a refusal: its state cannot move
    to another world size)."""
    try:
        load(*state)
    except ConfigError as exc:
        if reshard:
            raise
        raise CorruptSet(f"{where} part {name!r} does not load ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 (whatever a part's loader raises on bad state)
        raise CorruptSet(f"{where} part {name!r} does not load ({_first_line(exc)})") from None

