"""The config keys as ``largebatch keys`` shows them: type, default, allowed values, meaning.

Read from the section dataclasses (``config.sections``): every field's docstring travels in its
``metadata["doc"]``, so the reference can never drift from the code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Union

from largebatch.config.io import _type_name


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every leaf key: the reference a user reads with ``--help``."""
    return [(row.key, row.default, row.doc) for row in key_rows(cls, prefix)]


class KeyRow(typing.NamedTuple):
    """One leaf key as ``largebatch keys`` shows it."""

    key: str          # dotted, e.g. "optim.name"
    type: str         # as a user writes it: "int", "int|null", "list[float]"
    default: Any      # the Python default (format it with ``format_value``)
    doc: str          # the field's docstring
    section_doc: str  # first line of the section's docstring


def key_rows(cls: type, prefix: str = "") -> list[KeyRow]:
    """Every leaf key of ``cls`` with its type, default and documentation, in field order."""
    rows: list[KeyRow] = []
    hints = typing.get_type_hints(cls)
    section_doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += key_rows(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        item = _list_item(hint)
        if item is not None and dataclasses.is_dataclass(item):  # e.g. study.arms
            item_hints = typing.get_type_hints(item)
            parts = ", ".join(f"{g.name} ({type_label(item_hints[g.name])})"
                              for g in dataclasses.fields(item))
            doc = f"{doc} Each item: {parts}."
        rows.append(KeyRow(prefix + f.name, type_label(hint), default, doc, section_doc))
    return rows


def _list_item(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def type_label(tp: Any) -> str:
    """A type as a config author writes it: ``int|null``, ``list[float]``, ``list[arm]``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [type_label(a) for a in typing.get_args(tp) if a is not type(None)]
        nullable = type(None) in typing.get_args(tp)
        return "|".join(inner + (["null"] if nullable else []))
    if origin is list:
        return f"list[{type_label(_list_item(tp))}]"
    if dataclasses.is_dataclass(tp):  # ArmConfig -> "arm": a mapping, described in the doc
        return tp.__name__.removesuffix("Config").lower() or tp.__name__
    return _type_name(tp)


def format_value(value: Any) -> str:
    """A value as it is written in YAML or on the command line (``null``, ``true``, ``[1, 2]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else "''"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return repr(value)
