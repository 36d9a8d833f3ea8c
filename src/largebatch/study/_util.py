"""Small helpers shared by the study's report, verdicts and figures (no study imports)."""
from __future__ import annotations

import math
from typing import Any, Callable


def finite(value: Any) -> bool:
    """True for a real, finite number (not None, NaN, inf or a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table/prose cell: '—' for missing or non-finite, yes/no for bools, else ``spec``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def results_table(head: list[str], rows: list[dict], cells: Callable[[dict], list[str]]) -> str:
    """A markdown table with one line per row: ``cells(row)`` for a run that ran; for one that
    did not (skipped, failed), its arm and batch, dashes, and its note in the last column."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ran":
            row = [r["arm"], str(r["batch_size"])] + ["—"] * (len(head) - 3) + [r.get("note", "")]
        else:
            row = cells(r)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
