"""What a checkpoint set and a finished run say about themselves, typed and checked when read.

A set's ``manifest.json`` (``SetInfo``) and the run's ``done.json`` (``DoneMarker``) are
read against a schema: every field's type and range, no field missing and none unknown, and
the manifest's consistency with its set (the step in the directory's name, the trainer's file
and one file per rank of the world it was written at, nothing else in the directory; see
``store.verify_set``). A file that breaks it is a ``CorruptSet`` naming the field and the
value, which the checkpointer treats like any other corrupt set (quarantined, the previous
complete set used); nothing downstream ever sees an absurd world size or a step of the wrong
type. Reading is bounded: a metadata file that is not a regular file or is larger than
``MAX_JSON_BYTES`` is refused unread, JSON nested deeper than ``MAX_DEPTH`` is refused, and no
check loops over a claimed world size before the file list has been counted.

Schema of ``manifest.json`` (format 2)::

    format        int == 2 (another int: OtherFormat, refused in one line; else corrupt)
    step          int in [0, MAX_STEP]; equal to the N of the set's name step-N[.k]
    world_size    int in [1, MAX_WORLD_SIZE]
    epoch         int in [0, MAX_STEP]
    consumed      int in [0, MAX_STEP] (micro-batches into the epoch)
    files         object of exactly world_size + 1 entries: trainer.pt and rank-00000.pt ..
                  rank-{world_size-1:05d}.pt, each {"sha256": 64 lowercase hex digits,
                  "bytes": int in [1, MAX_FILE_BYTES]}
    config        non-empty object, nested at most MAX_DEPTH deep
    plan          null, or an object of batch-plan fields (PLAN_FIELDS, each typed and
                  ranged); one that names its world_size has every required field and the
                  manifest's world size
    created_unix  finite number >= 0
    torch         string of at most 64 characters

Schema of ``done.json``: ``step`` (int in [0, MAX_STEP]), ``set`` (a set name step-N[.k] with
N == step), ``stop_reason`` (string of at most 256 characters, or null), ``summary`` (object,
nested at most MAX_DEPTH deep); nothing else.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

#: The layout of a set (trainer file, rank files, manifest); another one is refused.
FORMAT = 2
MANIFEST = "manifest.json"
TRAINER_FILE = "trainer.pt"
DONE = "done.json"
#: No launch has more ranks than this; a manifest that says so is corrupt (and a loop over
#: its ranks must not run for hours).
MAX_WORLD_SIZE = 1 << 20
#: No run takes more optimizer steps than this (10^12): a larger step is a corrupt field.
MAX_STEP = 10 ** 12
#: No checkpoint file is larger (1 PiB).
MAX_FILE_BYTES = 1 << 50
#: A manifest is kilobytes (about 100 bytes per rank); a larger file is never read.
MAX_JSON_BYTES = 32 << 20
#: Deepest nesting of a config, plan or summary (a real config: 5, study.arms[i].overrides).
MAX_DEPTH = 16
SET_NAME = re.compile(r"^step-(\d+)(?:\.(\d+))?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MANIFEST_FIELDS = ("format", "step", "world_size", "epoch", "consumed", "files", "config",
                    "plan", "created_unix", "torch")
_DONE_FIELDS = ("step", "set", "stop_reason", "summary")


class CorruptSet(Exception):
    """A set that cannot be used; the message names the offending file or field."""


class OtherFormat(CorruptSet):
    """A set written in another layout (an older or newer largebatch): refused, not moved."""


def rank_file(rank: int) -> str:
    """Name of ``rank``'s file inside a set."""
    return f"rank-{rank:05d}.pt"


# ---- field checks -----------------------------------------------------------------------------
def _int(data: dict[str, Any], key: str, where: str, low: int = 0,
         high: int = MAX_STEP) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CorruptSet(f"{where}: {key}={_show(value)} is not an integer in [{low}, {high}]")
    return value


def _num(data: dict[str, Any], key: str, where: str, low: float = -math.inf) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value < low:
        raise CorruptSet(f"{where}: {key}={_show(value)} is not a finite number >= {low}")
    return float(value)


def _str(data: dict[str, Any], key: str, where: str, longest: int,
         optional: bool = False) -> str:
    value = data.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or len(value) > longest:
        raise CorruptSet(f"{where}: {key}={_show(value)} is not a string of at most "
                         f"{longest} characters")
    return value


def _dict(data: dict[str, Any], key: str, where: str, optional: bool = False
          ) -> Optional[dict[str, Any]]:
    value = data.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise CorruptSet(f"{where}: {key} is {type(value).__name__}, not an object")
    if _depth(value) > MAX_DEPTH:
        raise CorruptSet(f"{where}: {key} is nested deeper than {MAX_DEPTH} levels")
    return value


def _show(value: Any) -> str:
    """A value as a message shows it: repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (iterative: never a RecursionError)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level + 1) for v in
                             (node.values() if isinstance(node, dict) else node))
    return deepest


def _fields(data: Any, expected: tuple[str, ...], where: str) -> dict[str, Any]:
    """``data`` is an object with exactly the ``expected`` fields."""
    if not isinstance(data, dict):
        raise CorruptSet(f"{where}: {type(data).__name__}, not a JSON object")
    unknown = sorted(str(k) for k in data if k not in expected)
    if unknown:
        raise CorruptSet(f"{where}: unknown field {_show(unknown[0])}")
    missing = [k for k in expected if k not in data]
    if missing:
        raise CorruptSet(f"{where}: no {missing[0]!r} field")
    return data


# ---- the batch plan a manifest carries --------------------------------------------------------
def _pos(d: dict[str, Any], k: str, w: str) -> int:
    return _int(d, k, w, 1)


def _nat(d: dict[str, Any], k: str, w: str) -> int:
    return _int(d, k, w, 0)


def _bool(d: dict[str, Any], k: str, w: str) -> bool:
    if not isinstance(d.get(k), bool):
        raise CorruptSet(f"{w}: {k}={_show(d.get(k))} is not true or false")
    return d[k]


def _opt_pos(d: dict[str, Any], k: str, w: str) -> Optional[int]:
    return None if d.get(k) is None else _pos(d, k, w)


#: Every field a batch plan may hold, with its check (``BatchPlan.to_json``).
PLAN_FIELDS: dict[str, Callable[[dict[str, Any], str, str], Any]] = {
    "global_size": _pos, "micro_size": _pos, "accum_steps": _pos, "world_size": _pos,
    "dataset_size": _nat, "drop_last": _bool,
    "base_lr": lambda d, k, w: _num(d, k, w, 0.0), "scale_rule": lambda d, k, w: _str(d, k, w, 32),
    "base_batch": _pos, "peak_lr": lambda d, k, w: _num(d, k, w, 0.0), "warmup_steps": _nat,
    "max_global_size": _opt_pos,
    "micro_auto": lambda d, k, w: _dict(d, k, w, optional=True),
    "lr_auto": lambda d, k, w: _dict(d, k, w, optional=True),
    "samples_per_step": _nat, "shard_size": _nat, "micro_batches_per_epoch": _nat,
    "steps_per_epoch": _nat,
}
#: The fields ``BatchPlan.from_json`` needs: a plan that names its world size has them all.
PLAN_REQUIRED = ("global_size", "micro_size", "accum_steps", "world_size", "dataset_size",
                 "drop_last", "base_lr", "scale_rule", "base_batch", "peak_lr", "warmup_steps")


def check_plan(plan: Optional[dict[str, Any]], world: int, where: str) -> None:
    """Check a manifest's plan field by field (see the module's schema).

    Raises:
        CorruptSet: an unknown field, a field of the wrong type or range, an incomplete plan
            for a world, or a world other than the manifest's.
    """
    if plan is None:
        return
    where = f"{where}: plan"
    for key in plan:
        if key not in PLAN_FIELDS:
            raise CorruptSet(f"{where}: unknown field {_show(key)}")
        PLAN_FIELDS[key](plan, key, where)
    if "world_size" in plan:
        missing = [k for k in PLAN_REQUIRED if k not in plan]
        if missing:
            raise CorruptSet(f"{where}: no {missing[0]!r} field")
        if plan["world_size"] != world:
            raise CorruptSet(f"{where}: world_size={plan['world_size']} but the manifest's "
                             f"world_size is {world}")


# ---- reading JSON files, bounded --------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path) -> Any:
    """A small metadata file's strict JSON (no NaN/Infinity), read only when it is a regular
    file of at most ``MAX_JSON_BYTES``.

    Raises:
        FileNotFoundError: it does not exist.
        CorruptSet: not a regular file, too large, unreadable, not strict JSON or nested too
            deep for the parser.
    """
    st = os.stat(path)  # FileNotFoundError passes through: "missing" is the caller's word
    if not stat.S_ISREG(st.st_mode):
        raise CorruptSet(f"{path} is not a regular file")
    if st.st_size > MAX_JSON_BYTES:
        raise CorruptSet(f"{path} is {st.st_size} bytes: not a metadata file "
                         f"(at most {MAX_JSON_BYTES})")
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_JSON_BYTES + 1).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (OSError, ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise CorruptSet(f"{path} is unreadable ({type(exc).__name__}: {first})") from None


# ---- the manifest -----------------------------------------------------------------------------
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
        """Check a manifest against the schema (the module's docstring).

        Raises:
            OtherFormat: another layout version (an integer format other than ours).
            CorruptSet: anything else that breaks the schema, naming the field and value.
        """
        fmt = data.get("format") if isinstance(data, dict) else None
        if isinstance(data, dict) and "format" in data and \
                (type(fmt) is not int or fmt != FORMAT):
            if type(fmt) is int and 0 < fmt < 1000:
                raise OtherFormat(f"{where}: format {fmt}, this largebatch reads format "
                                  f"{FORMAT}")
            raise CorruptSet(f"{where}: format={_show(fmt)} is not a layout version")
        data = _fields(data, _MANIFEST_FIELDS, where)
        world = _int(data, "world_size", where, 1, MAX_WORLD_SIZE)
        files = _files(_dict(data, "files", where), world, where)
        config = _dict(data, "config", where)
        if not config:
            raise CorruptSet(f"{where}: config is empty")
        plan = _dict(data, "plan", where, optional=True)
        check_plan(plan, world, where)
        return cls(step=_int(data, "step", where), world_size=world,
                   epoch=_int(data, "epoch", where), consumed=_int(data, "consumed", where),
                   files=files, config=config, plan=plan,
                   created_unix=_num(data, "created_unix", where, 0.0),
                   torch=_str(data, "torch", where, 64), format=FORMAT)


def _files(raw: dict[str, Any], world: int, where: str) -> dict[str, FileEntry]:
    """The file list: exactly the trainer's file and one per rank, each hash and size."""
    if len(raw) != world + 1:  # counted before any name is built: world may be huge
        raise CorruptSet(f"{where}: lists {len(raw)} files for world_size {world} "
                         f"(expected {world + 1})")
    expected = {TRAINER_FILE, *(rank_file(r) for r in range(world))}
    files = {}
    for name, entry in raw.items():
        if name not in expected:
            raise CorruptSet(f"{where}: lists {_show(name)}, not a file of a world-{world} set")
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"} or \
                not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            raise CorruptSet(f"{where}: files[{name!r}] is not "
                             f"{{\"sha256\": 64 hex digits, \"bytes\": size}}")
        files[name] = FileEntry(entry["sha256"],
                                _int(entry, "bytes", f"{where}: files[{name!r}]", 1,
                                     MAX_FILE_BYTES))
    return files


def read_set_info(path: Path) -> SetInfo:
    """The checked manifest of set ``path`` (its step agreeing with the set's name).

    Raises:
        CorruptSet: missing, unreadable, too large or invalid (``SetInfo.from_json``).
    """
    where = path / MANIFEST
    try:
        data = read_json(where)
    except FileNotFoundError:
        raise CorruptSet(f"{where} is missing") from None
    except OSError as exc:
        raise CorruptSet(f"{where} is unreadable ({exc.strerror})") from None
    info = SetInfo.from_json(data, str(where))
    m = SET_NAME.match(path.name)
    if m and int(m.group(1)) != info.step:
        raise CorruptSet(f"{where}: step={info.step} but the set is named {path.name}")
    return info


# ---- the finished run's marker ----------------------------------------------------------------
@dataclass(frozen=True)
class DoneMarker:
    """``done.json``: the run finished; its final set, step, why it stopped, its summary."""

    step: int
    set: str
    stop_reason: str
    summary: dict[str, Any]

    @classmethod
    def from_json(cls, data: Any, where: str) -> "DoneMarker":
        """Check a done marker against its schema (the module's docstring).

        Raises:
            CorruptSet: a missing, unknown or invalid field, or a set name of another step.
        """
        data = _fields(data, _DONE_FIELDS, where)
        step = _int(data, "step", where)
        name = _str(data, "set", where, 64)
        m = SET_NAME.match(name)
        if not m or int(m.group(1)) != step:
            raise CorruptSet(f"{where}: set={_show(name)} is not the name of a set of step "
                             f"{step}")
        return cls(step=step, set=name, stop_reason=_str(data, "stop_reason", where, 256,
                                                         optional=True),
                   summary=_dict(data, "summary", where))

    @classmethod
    def check(cls, directory: Path) -> tuple[Optional["DoneMarker"], str]:
        """The checked marker of ``directory`` and '' , or None and why not ('' when there
        is none). Never raises."""
        path = directory / DONE
        try:
            return cls.from_json(read_json(path), str(path)), ""
        except FileNotFoundError:
            return None, ""
        except (OSError, CorruptSet) as exc:
            return None, str(exc) if isinstance(exc, CorruptSet) else f"{path}: {exc.strerror}"

    @classmethod
    def read(cls, directory: Path) -> Optional["DoneMarker"]:
        """The checked marker of ``directory``, or None (absent, unreadable or invalid: a
        marker that lies is no marker; the sets decide)."""
        return cls.check(directory)[0]
