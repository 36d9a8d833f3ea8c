"""Dataclass configs from YAML and dotted overrides, with type checks that name the key.

Generic machinery (no section knows about it): ``largebatch.config`` defines the sections.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from largebatch.errors import ConfigError  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the offending key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``; convert int->float; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # str last: it takes what the others would (24 -> '24'), and typing may hand back a
        # cached equal union in another order (Union[str, int] == Union[int, str]).
        inner = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        for tp_i in inner[1:]:  # e.g. int|str ('auto'): the first type that takes the value
            if _matches(value, inner[0]):
                break
            if _matches(value, tp_i):
                return _coerce(value, tp_i, key)
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``_coerce`` accepts ``value`` as ``tp`` (for unions of several types)."""
    try:
        _coerce(value, tp, "")
    except ConfigError:
        return False
    return True


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_hint(key, prefix, names)} "
                              f"(known in this section: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


#: insightface arcface_torch's config names (``configs/*.py``) and what largebatch calls them:
#: a user bringing a recipe gets the key to write, not just "unknown".
ARCFACE_KEYS = {
    "margin_list": "face.margin=combined with face.m1, face.m2, face.m3 (arcface_torch's "
                   "(m1, m2, m3); ArcFace (1.0, 0.5, 0.0) is face.margin=arcface face.m2=0.5, "
                   "CosFace (1.0, 0.0, 0.4) face.margin=cosface face.m3=0.4)",
    "loss": "face.margin", "network": "model.name (r50 -> iresnet50)",
    "fp16": "train.precision=fp16", "embedding_size": "face.embedding_size",
    "sample_rate": "face.sample_rate", "num_classes": "face.num_classes",
    "lr": "optim.lr (with optim.base_batch: the batch that LR is for)",
    "momentum": "optim.momentum", "weight_decay": "optim.weight_decay",
    "optimizer": "optim.name", "batch_size": "batch.micro_size (per GPU, as arcface_torch's) "
    "or batch.global_size", "gradient_acc": "batch.accum_steps",
    "num_epoch": "train.epochs", "warmup_epoch": "schedule.warmup_epochs",
    "val_targets": "face.val_targets", "rec": "data.root (with data.name=recordio)",
    "num_image": "nothing (read from the data)", "output": "log.out_dir",
    "resume": "checkpoint.resume", "seed": "train.seed", "num_workers": "data.num_workers",
    "frequent": "log.every_steps", "verbose": "train.eval_every_samples (in samples)",
    "local_rank": "nothing (LOCAL_RANK is read from the environment)",
    "dali": "nothing (RecordIO is read without DALI)",
}


def _hint(key: str, prefix: str, names: set[str]) -> str:
    """', did you mean ...?' for a misspelt key or an arcface_torch name ('' for none)."""
    if key in ARCFACE_KEYS:
        return f" (arcface_torch's {key}: here {ARCFACE_KEYS[key]})"
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
    return f", did you mean '{prefix}{close[0]}'?" if close else ""


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts/lists (JSON and YAML safe)."""
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section (neither is modified)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-6`` as a float (YAML 1.2; PyYAML's 1.1 rules
    need a dot, ``1.0e-6``, and would hand the optimizer the string '1e-6')."""


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (no tags, no Python objects)."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{p}: invalid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return data


def parse_override(text: str) -> dict:
    """Turn ``a.b.c=value`` into ``{"a": {"b": {"c": value}}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (in order) on top of a raw config mapping."""
    for text in overrides:
        data = deep_merge(data, parse_override(text))
    return data


def get_key(cfg: Any, dotted: str) -> Any:
    """Read a dotted key from a config object."""
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
