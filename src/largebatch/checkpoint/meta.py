"""What a checkpoint set and a finished run say about themselves, typed and checked when read.

A set's ``manifest.json`` (``SetInfo``) and the run's ``done.json`` (``DoneMarker``) are
read against a schema: every field's type, its range, and the manifest's consistency with the
files it must list (the trainer's file and one per rank of the world it was written at). A
file that breaks it is a ``CorruptSet`` naming the field and the value, which the checkpointer
treats like any other corrupt set (quarantined, the previous complete set used); nothing
downstream ever sees an absurd world size or a step of the wrong type.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

#: The layout of a set (trainer file, rank files, manifest); another one is refused.
FORMAT = 2
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
DONE = "done.json"
#: No launch has more ranks than this; a manifest that says so is corrupt (and a loop over
#: its ranks must not run for hours).
MAX_WORLD_SIZE = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CorruptSet(Exception):
    """A set that cannot be used; the message names the offending file or field."""


class OtherFormat(CorruptSet):
    """A set written in another layout (an older or newer largebatch): refused, not moved."""


def rank_file(rank: int) -> str:
    """Name of ``rank``'s file inside a set."""
    return f"rank-{rank:05d}.pt"


def _int(data: dict[str, Any], key: str, where: str, low: int = 0,
         high: int = 1 << 62) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CorruptSet(f"{where}: {key}={value!r} is not an integer in [{low}, {high}]")
    return value


def _num(data: dict[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise CorruptSet(f"{where}: {key}={value!r} is not a finite number")
    return float(value)


def _dict(data: dict[str, Any], key: str, where: str, optional: bool = False
          ) -> Optional[dict[str, Any]]:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise CorruptSet(f"{where}: {key} is {type(value).__name__}, not an object")
    return value


@dataclass(frozen=True)
class FileEntry:
    """One file of a set: its sha256 and size."""

    sha256: str
    bytes: int


@dataclass(frozen=True)
class SetInfo:
    """A set's manifest: what it holds and where in the run it was written."""

    step: int
    world_size: int
    epoch: int
    consumed: int
    files: dict[str, FileEntry]
    config: dict[str, Any] = field(default_factory=dict)
    plan: Optional[dict[str, Any]] = None
    created_unix: float = 0.0
    torch: str = ""
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        """The manifest as written."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "SetInfo":
        """Check a manifest's fields and its file list.

        Raises:
            OtherFormat: another layout version.
            CorruptSet: a field of the wrong type or range, or a file missing from the list.
        """
        if not isinstance(data, dict):
            raise CorruptSet(f"{where}: not a JSON object")
        if data.get("format") != FORMAT:
            raise OtherFormat(f"{where}: format {data.get('format')!r}, this largebatch reads "
                              f"format {FORMAT}")
        world = _int(data, "world_size", where, 1, MAX_WORLD_SIZE)
        raw_files = _dict(data, "files", where)
        files = {}
        for name, entry in raw_files.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or \
                    not _SHA256.match(entry["sha256"]):
                raise CorruptSet(f"{where}: files[{name!r}] has no valid sha256")
            files[name] = FileEntry(entry["sha256"], _int(entry, "bytes", f"{where}: {name}"))
        if len(files) != world + 1:  # checked before building names: world may be huge
            raise CorruptSet(f"{where}: lists {len(files)} files for world_size {world} "
                             f"(expected {world + 1})")
        missing = {TRAINER_FILE, *(rank_file(r) for r in range(world))} - set(files)
        if missing:
            raise CorruptSet(f"{where}: lists no {sorted(missing)[0]}")
        return cls(step=_int(data, "step", where), world_size=world,
                   epoch=_int(data, "epoch", where), consumed=_int(data, "consumed", where),
                   files=files, config=_dict(data, "config", where, optional=True) or {},
                   plan=_dict(data, "plan", where, optional=True),
                   created_unix=_num(data, "created_unix", where),
                   torch=str(data.get("torch", "")), format=FORMAT)


def read_set_info(path: Path) -> SetInfo:
    """The checked manifest of set ``path``.

    Raises:
        CorruptSet: missing, unreadable, too large or invalid (``SetInfo.from_json``).
    """
    where = path / MANIFEST
    try:
        if where.stat().st_size > 64 << 20:  # a manifest is kilobytes; never read gigabytes
            raise CorruptSet(f"{where} is {where.stat().st_size} bytes: not a manifest")
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise CorruptSet(f"{where} is missing") from None
    except (OSError, ValueError) as exc:
        raise CorruptSet(f"{where} is unreadable ({exc})") from None
    return SetInfo.from_json(data, str(where))


@dataclass(frozen=True)
class DoneMarker:
    """``done.json``: the run finished; its final set, step, why it stopped, its summary."""

    step: int
    set: str
    stop_reason: str
    summary: dict[str, Any]

    @classmethod
    def read(cls, directory: Path) -> Optional["DoneMarker"]:
        """The checked marker of ``directory``, or None (absent, unreadable or invalid: a
        marker that lies is no marker; the sets decide)."""
        path = directory / DONE
        try:
            if path.stat().st_size > 64 << 20:
                return None
            data = json.loads(path.read_text())
            return cls(step=_int(data, "step", str(path)), set=_str(data, "set", str(path)),
                       stop_reason=str(data.get("stop_reason") or ""),
                       summary=_dict(data, "summary", str(path)))
        except (OSError, ValueError, CorruptSet, AttributeError):
            return None


def _str(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise CorruptSet(f"{where}: {key}={value!r} is not a name")
    return value
