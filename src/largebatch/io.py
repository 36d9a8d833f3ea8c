"""One helper per job that several packages need: durable files, JSON Lines, RNG streams,
dotted keys. Nothing here knows about training; everything above may import it.

* **Durable, atomic writes** (``write_bytes_atomic``, ``write_json_atomic``): the bytes go to a
  temp file in the same directory (``.NAME.tmpPID``: hidden, per process, so two writers never
  share one), which is fsynced, renamed over the target in one step and the directory fsynced.
  A reader sees the old file or the new one, never half of one; a crash leaves at most a temp
  file behind.
* **Strict JSON** (``json_safe``, ``json_number``): a non-finite float is written as ``null``
  with a sibling ``KEY_nonfinite`` naming it ('nan', 'inf', '-inf'), and read back as a float.
* **JSON Lines** (``read_jsonl``): tolerant of a torn last line (a killed writer), strict
  elsewhere.
* **RNG streams** (``rng_state`` / ``set_rng_state``): Python, NumPy, torch CPU and CUDA, as
  tensors and plain values so that ``torch.load(weights_only=True)`` can read them back.
* **Dotted keys** (``get_dotted`` / ``set_dotted``): ``a.b.c`` into nested mappings or objects.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping

import torch


# ---- durable files --------------------------------------------------------------------------
def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (no rename) and fsync the file."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def temp_path(path: str | Path) -> Path:
    """The temp name ``write_bytes_atomic`` uses for ``path``: hidden, per process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes_atomic(path: str | Path, data: bytes, make_parents: bool = True) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, rename, fsync
    of the directory). Returns the path."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


#: A non-finite float is written as ``null`` and its key gets a sibling ``KEY + NONFINITE``
#: saying which value it was (the face metrics' ``KEY_note`` habit): strict JSON has no
#: NaN/Infinity, and a reader must not mistake a string for a number or lose why it is null.
NONFINITE = "_nonfinite"


def _nonfinite(value: Any) -> str | None:
    """'nan', 'inf' or '-inf' for a non-finite float, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if value != value else ("inf" if value > 0 else "-inf")
    return None


def _reasons(value: Any) -> Any:
    """What the sibling ``KEY_nonfinite`` of ``value`` holds: the reason of a non-finite
    float, ``{index: reason}`` for a list holding some, else None (no sibling)."""
    why = _nonfinite(value)
    if why is None and isinstance(value, (list, tuple)):
        why = {str(i): r for i, r in ((i, _nonfinite(v)) for i, v in enumerate(value)) if r}
    return why or None


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can hold it: every non-finite float becomes None, and in a
    mapping its key gets a sibling ``KEY_nonfinite`` ('nan', 'inf', '-inf'; for a list,
    ``{index: reason}``), e.g. ``{"final_loss": None, "final_loss_nonfinite": "nan"}``.
    Idempotent (a summary read back and written again is unchanged)."""
    if _nonfinite(value) is not None:
        return None
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            out[k] = json_safe(v)
            why = _reasons(v)
            if why is not None:
                out[f"{k}{NONFINITE}"] = why
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_number(record: Mapping[str, Any], key: str) -> float:
    """Field ``key`` of a record ``json_safe`` wrote, as a float: the number, the non-finite
    value its ``KEY_nonfinite`` names, NaN when absent or null; files written before
    non-finite values became null held them as the strings 'nan'/'inf', which read too."""
    value = record.get(key)
    if value is None or isinstance(value, bool):
        value = record.get(f"{key}{NONFINITE}")
    try:
        return float(value) if isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        return math.nan


def json_text(obj: Any, indent: int | None = 2) -> str:
    """``obj`` as strict JSON text (non-finite floats as null with a reason, see
    ``json_safe``; other objects by ``str``)."""
    return json.dumps(json_safe(obj), indent=indent, default=str, allow_nan=False)


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """``obj`` as indented strict JSON, written atomically and durably."""
    return write_bytes_atomic(path, (json_text(obj) + "\n").encode())


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` into memory."""
    import io as _io
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ---- JSON Lines -----------------------------------------------------------------------------
def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a JSON Lines file, in order; blank lines are skipped and a torn LAST
    line (a writer killed mid-line) is dropped. A bad line elsewhere raises ValueError naming
    the file and the line number."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = fh.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if number == last:
                return  # the tail a killed writer left
            raise ValueError(f"{path}:{number + 1}: not a JSON record ({exc})") from None
        if isinstance(record, dict):
            yield record


def read_jsonl(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """``iter_jsonl`` as a list, optionally only the records whose ``kind`` is ``kind``; an
    absent file reads as no records."""
    if not Path(path).is_file():
        return []
    return [r for r in iter_jsonl(path) if kind is None or r.get("kind") == kind]


# ---- RNG streams ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's RNG streams: Python, torch CPU, CUDA (when in use), NumPy (when loaded),
    as tensors and plain values (a ``weights_only`` load reads them back)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")),
                          "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore ``rng_state``."""
    random.setstate(_as_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), int(n["pos"]),
                             int(n["has_gauss"]), float(n["gauss"])))


def _as_python_state(state: Any) -> tuple:
    """``random.setstate`` wants tuples; a state that went through ``torch.load`` has lists."""
    version, internal, gauss = state
    return int(version), tuple(int(v) for v in internal), gauss


# ---- dotted keys ----------------------------------------------------------------------------
def get_dotted(obj: Any, dotted: str) -> Any:
    """``obj.a.b`` (or ``obj['a']['b']``) for ``'a.b'``."""
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


def set_dotted(mapping: MutableMapping[str, Any], dotted: str, value: Any) -> None:
    """``mapping['a']['b'] = value`` for ``'a.b'``, creating the inner mappings."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        mapping = mapping.setdefault(part, {})
    mapping[leaf] = value
