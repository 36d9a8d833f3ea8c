"""``largebatch keys [PREFIX]``: every config key as a table: type, default, choices, meaning.

The table is grouped by section (the dotted prefix), each key's documentation wrapped beneath
its row, to the terminal's width (80 to 120 columns).
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import textwrap
from typing import TYPE_CHECKING, Sequence

from largebatch.config import ConfigError

if TYPE_CHECKING:
    from largebatch.config.keys import KeyRow

HELP = "list every config key with its type, default, choices and meaning"
EXAMPLES = """\
examples:
  largebatch keys                  # every key: type, default, allowed values, meaning
  largebatch keys optim            # only optim.*
  largebatch keys schedule.plateau"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's one optional argument, the key prefix.

    Args:
        parser: the ``keys`` sub-command's parser.
    """
    parser.add_argument("prefix", nargs="?", default="",
                        help="show only keys starting with this (e.g. optim, schedule.plateau)")


def run(args: argparse.Namespace) -> int:
    """Print the table of the keys that start with ``args.prefix``.

    Args:
        args: the parsed ``prefix`` ("" for every key).

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: no key starts with the prefix.
    """
    from largebatch.config import Config, choices
    from largebatch.config.keys import key_rows
    rows = [r for r in key_rows(Config) if r.key.startswith(args.prefix)]
    if not rows:
        raise ConfigError(f"no config key starts with {args.prefix!r} (see `largebatch keys`)")
    width = max(80, min(120, shutil.get_terminal_size((100, 24)).columns))
    print(render_keys(rows, choices(), width))
    return 0


def render_keys(rows: list[KeyRow], choices: dict[str, Sequence[object]],
                width: int = 100) -> str:
    """The key reference as a table grouped by section; each key's doc wrapped beneath it.

    Args:
        rows: the keys to show, in order (one section's keys next to each other).
        choices: the allowed values per dotted key (keys without a closed list are absent).
        width: the table's width in columns.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    from largebatch.config.keys import format_value
    cells = [(r.key, r.type, format_value(r.default), ", ".join(map(str, choices.get(r.key, ()))))
             for r in rows]
    key_w = max(len(c[0]) for c in cells)
    type_w = max(len(c[1]) for c in cells)
    default_w = min(24, max(len(c[2]) for c in cells))
    choice_w = max(16, width - 2 - key_w - type_w - default_w - 6)
    widths = (key_w, type_w, default_w, choice_w)
    out = [_table_line(("key", "type", "default", "choices"), widths),
           _table_line(tuple("-" * w for w in widths), widths)]
    by_section = itertools.groupby(zip(rows, cells), key=lambda rc: rc[0].key.rsplit(".", 1)[0])
    for section, group in by_section:
        group = list(group)
        out += ["", f"{section}: {group[0][0].section_doc}"]
        for row, cell in group:
            out.append(_table_line(cell, widths))
            out += textwrap.wrap(row.doc, width - 6, initial_indent=" " * 6,
                                 subsequent_indent=" " * 6)
    return "\n".join(out)


def _table_line(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    """One table row; a cell longer than its column wraps onto continuation lines.

    Args:
        cells: the row's cell texts, one per column.
        widths: the columns' widths.

    Returns:
        The row's line(s), each indented by two spaces, trailing spaces stripped.
    """
    wrapped = [textwrap.wrap(c, w, break_on_hyphens=False) or [""] for c, w in zip(cells, widths)]
    lines = []
    for parts in itertools.zip_longest(*wrapped, fillvalue=""):
        lines.append("  " + "  ".join(p.ljust(w) for p, w in zip(parts, widths)).rstrip())
    return "\n".join(lines)
