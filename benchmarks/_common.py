"""Helpers shared by the benchmark scripts: machine description, medians, markdown tables.

The benchmarks run on a small, shared machine, so every script interleaves its contenders
and reports medians over repeats; this module keeps that bookkeeping in one place.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
SEED_CONFIG = REPO / "configs" / "mnist" / "seed.yaml"


def default_data_root() -> str:
    """``$LARGEBATCH_DATA_ROOT``, else the repository's ``data/`` (the download folder)."""
    return os.environ.get("LARGEBATCH_DATA_ROOT") or str(REPO / "data")


def check_data_root(root: str) -> Path:
    """The MNIST root, or exit with one line saying where the files must be."""
    path = Path(root)
    if not (path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        sys.exit(f"benchmark: error: no MNIST under {path.resolve()}/MNIST/raw "
                 f"(pass --data-root or set LARGEBATCH_DATA_ROOT)")
    return path.resolve()


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform's answer elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare numbers: CPU, cores, load, torch and its threads."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
            "loadavg_1m": round(load[0], 2)}


def print_machine(extra: dict[str, Any] | None = None) -> None:
    """One markdown line describing the machine (and the benchmark's own settings)."""
    info = machine_info() | (extra or {})
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def median(values: Iterable[float]) -> float:
    """The median (NaN for no values)."""
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the values, for showing the noise next to a median."""
    return f"{min(values):.4g}-{max(values):.4g}" if values else "-"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep 4 significant digits."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: str | None, obj: Any) -> None:
    """Dump the raw results when ``--json PATH`` was given (for the docs or a later diff)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")
