"""What both study test files share: one quick study through the CLI, and reading its output."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from tests.conftest import run_cli


def quick_study(out: Path, study: Path, *args: str, timeout: int) -> tuple:
    """Run ``largebatch study STUDY study.quick=true ARGS`` into ``out``; returns
    (out, stdout, rows of study.csv, study.json)."""
    proc = run_cli("study", str(study), "study.quick=true", *args, f"log.out_dir={out}",
                   timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "study.csv") as fh:
        rows = list(csv.DictReader(fh))
    return out, proc.stdout, rows, json.loads((out / "study.json").read_text())


def num(row: dict, key: str) -> float:
    """A CSV cell as a float (NaN when empty)."""
    return float(row[key]) if row[key] != "" else math.nan


def records(run_dir: Path) -> list[dict]:
    """A run's metrics.jsonl records."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
