"""Dataclass configs from YAML and dotted overrides, with type checks that name the key.

Generic machinery (no section knows about it): ``largebatch.config`` defines the sections.
"""
from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from largebatch.errors import ConfigError  # noqa: F401 (re-exported)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the offending key.


class _Short(reprlib.Repr):
    """How much of a wrong value an error line shows: enough to recognise it, never a huge
    repr (a list of 10^5 items, a long string); dicts keep their order, as ``repr``."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother, self.maxlong = 3, 120, 120, 60
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 8

    def repr_dict(self, x: dict, level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items + ["..."] * (len(x) > self.maxdict)) + "}"


def _show(value: Any) -> str:
    """``repr(value)``, shortened where it is long (the error line stays short)."""
    return _Short().repr(value)


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
            raise ConfigError(f"{key}: expected a section (mapping), got {_show(value)}")
        return from_dict(tp, value, prefix=key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
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


#: A config file is a few KiB; anything above this is refused before it is read.
MAX_YAML_BYTES = 1 << 20
#: Nodes a document may hold with its aliases expanded (``&a``/``*a`` reuse a node; a
#: 700-byte "billion laughs" expands to 10^9), and nesting depth (the composer recurses).
MAX_YAML_NODES = 20_000
MAX_YAML_DEPTH = 64
#: Characters of scalar text with the aliases expanded (what a repr of the document holds).
MAX_YAML_CHARS = 4 << 20


class YAMLLimitError(yaml.YAMLError):
    """A document past ``MAX_YAML_NODES``/``MAX_YAML_DEPTH``/``MAX_YAML_CHARS`` (a YAMLError,
    so ``safe_load`` keeps ``yaml.safe_load``'s contract); ``read_yaml`` names the file."""


def _expanded_size(root: yaml.Node) -> None:
    """Count the document's nodes and scalar characters as if every alias were copied, in
    time linear in the distinct nodes (each node's total is computed once); refuse a
    recursive alias and a total past the limits, before anything is constructed."""
    totals: dict[int, tuple[int, int]] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            totals[key] = (1, len(node.value))
            continue
        kids = (node.value if isinstance(node, yaml.SequenceNode)
                else [n for pair in node.value for n in pair])
        if done:
            open_nodes.discard(key)
            nodes = 1 + sum(totals[id(k)][0] for k in kids)
            chars = sum(totals[id(k)][1] for k in kids)
            totals[key] = (nodes, chars)
            if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
                raise YAMLLimitError(
                    f"its aliases expand the node at line {node.start_mark.line + 1} alone to "
                    f"{nodes} nodes and {chars} characters, over the limit of {MAX_YAML_NODES} "
                    f"nodes and {MAX_YAML_CHARS} characters (refused before expanding)")
        elif key in open_nodes:
            raise YAMLLimitError(f"an alias at line {node.start_mark.line + 1} refers to a "
                                 f"node that contains it (a recursive alias)")
        elif key not in totals:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in totals)


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-6`` as a float (YAML 1.2; PyYAML's 1.1 rules
    need a dot, ``1.0e-6``, and would hand the optimizer the string '1e-6'), and refuses a
    document past the node, depth and alias-expansion limits before constructing it."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth, self._nodes = 0, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        self._nodes += 1
        if self._depth > MAX_YAML_DEPTH or self._nodes > MAX_YAML_NODES:
            mark = self.peek_event().start_mark
            what = (f"nested deeper than {MAX_YAML_DEPTH} levels" if self._depth > MAX_YAML_DEPTH
                    else f"more than {MAX_YAML_NODES} nodes")
            raise YAMLLimitError(f"{what} (line {mark.line + 1}): refused")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node)
        return node


_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 exponent floats (no tags, no Python objects).

    Raises:
        yaml.YAMLError: malformed YAML, or (``YAMLLimitError``) a document with more than
            ``MAX_YAML_NODES`` nodes or ``MAX_YAML_CHARS`` scalar characters once its aliases
            are expanded, or nested deeper than ``MAX_YAML_DEPTH``: refused before any of it
            is built.
    """
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file.

    A file over ``MAX_YAML_BYTES`` is refused from its size, unread; see ``safe_load`` for
    the limits on what it may expand to.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)  # bounded even if the file grows meanwhile
            size = max(len(raw), os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror})") from None
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{p}: {size} bytes, over the {MAX_YAML_BYTES}-byte limit on a "
                          f"config file (refused unread)")
    try:
        data = safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except YAMLLimitError as exc:
        raise ConfigError(f"{p}: refused: {exc}") from None
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
    except YAMLLimitError as exc:
        raise ConfigError(f"override '{key}': refused: {exc}") from None
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
