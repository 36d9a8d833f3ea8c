"""PNG curves of one or more runs' ``metrics.jsonl``: reading runs, building figures, drawing.

What is drawn, per run (several runs are overlaid, one colour and legend entry each):

- training loss, raw and a trailing moving average of ``smooth`` records, against optimizer
  steps, samples seen and training time (``train`` records);
- every validation metric (every numeric field of the ``eval`` records: val_acc, val_loss,
  verification_acc, ...) against the same three axes;
- the learning rate and the global batch size against steps, and the gradient norm when it
  was logged; ``plan_change`` records (batch growth, LR cut on plateau) are vertical lines on
  every against-steps figure, ``skip`` records (dropped windows) dotted lines on the loss.

``epoch`` records (timings) are not plotted. The command is ``largebatch plot``
(:mod:`largebatch.cli.plot`). This module stays light to import (the command imports it for
``--help``): matplotlib is imported only when drawing (:func:`pyplot`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from largebatch.config import ConfigError
from largebatch.io import NONFINITE

DEFAULT_SMOOTH = 10
#: eval-record fields that are positions, not metrics.
POSITION_KEYS = ("kind", "step", "epoch", "samples", "time_s")
#: x axes of the loss and validation figures: file suffix -> (record key, axis label).
X_AXES = {"steps": ("step", "optimizer step"), "samples": ("samples", "samples seen"),
          "time": ("time_s", "training time (s)")}

Series = tuple[list[float], list[float]]


@dataclass
class Run:
    """One run directory's records, as read from disk."""

    path: Path
    name: str
    records: list[dict[str, Any]]
    plan: Optional[dict[str, Any]] = None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]


@dataclass
class Figure:
    """What one PNG shows: ``series`` label -> (x, y), and vertical markers per label."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, Series] = field(default_factory=dict)
    #: marker label (e.g. "run-a grow_batch") -> x positions of the vertical lines
    vlines: dict[str, list[float]] = field(default_factory=dict)
    #: labels drawn as step functions (a value that holds until the next point)
    steps: set[str] = field(default_factory=set)
    #: label (series or marker) -> the run it belongs to (its colour)
    owner: dict[str, str] = field(default_factory=dict)

    def add(self, run: str, label: str, xy: Series) -> None:
        self.series[label] = xy
        self.owner[label] = run

    def mark(self, run: str, label: str, xs: list[float]) -> None:
        self.vlines[label] = xs
        self.owner[label] = run


# ---- reading ----------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one ``metrics.jsonl``; a torn (unparsable) last line is dropped.

    Raises:
        ConfigError: the file is missing, empty, or a line other than the last is not a JSON
            object (one line, naming the file and the line number).
    """
    if not path.is_file():
        raise ConfigError(f"{path} not found (is {path.parent} a largebatch run directory?)")
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records = []
    for pos, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "kind" not in record:
            if pos == len(lines) - 1:
                break  # the line a killed run was writing: everything before it is good
            raise ConfigError(f"{path}: line {number} is not a metrics record (corrupt file?)")
        records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no metrics records (empty, or only a line cut short "
                          "by a killed run)")
    return records


def load_run(directory: str | Path, name: str) -> Run:
    """A run directory's records and, if readable, its initial batch plan (``plan.json``)."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"run directory {path} does not exist")
    records = read_records(path / "metrics.jsonl")
    if not any(r["kind"] in ("train", "eval") for r in records):
        raise ConfigError(f"{path / 'metrics.jsonl'} has no train or eval record to plot")
    plan = None
    try:
        plan = json.loads((path / "plan.json").read_text())
    except (OSError, ValueError):
        pass  # the batch size is then taken from the samples each step added
    return Run(path, name, records, plan if isinstance(plan, dict) else None)


def run_names(directories: list[str | Path]) -> list[str]:
    """Legend names: each directory's name, with as many parent folders as make them unique."""
    parts = [Path(d).resolve().parts for d in directories]
    names = []
    for i, p in enumerate(parts):
        depth = 1
        while depth < len(p) and any(q[-depth:] == p[-depth:] for j, q in enumerate(parts)
                                     if j != i and q != p):
            depth += 1
        name = "/".join(p[-depth:])
        copies = sum(1 for q in parts[:i] if q == p)  # the same directory given twice
        names.append(f"{name} #{copies + 1}" if copies else name)
    return names


# ---- series -----------------------------------------------------------------------------------
def number(value: Any) -> float:
    """A metrics field as a float: a missing or null (non-finite, see ``io.json_safe``)
    value is NaN; the strings 'nan'/'inf' of older files read as what they say."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def moving_average(values: list[float], k: int) -> list[float]:
    """Trailing mean of the last ``k`` finite values at each point (fewer at the start)."""
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1):i + 1] if math.isfinite(v)]
        out.append(sum(window) / len(window) if window else math.nan)
    return out


def eval_metric_names(runs: list[Run]) -> list[str]:
    """Every numeric eval field over all runs, in first-seen order, each metric once: the face
    task's primary figures (``verification_acc``, ``tar_at_far_1e-3``, ...) ARE its first named
    set's (``lfw_acc``, ``lfw_tar_at_far_1e-3``); where every eval record says so, only the
    named one is drawn."""
    names: dict[str, None] = {}
    for run in runs:
        for r in run.of_kind("eval"):
            for key, value in r.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                # A non-finite value is null beside its KEY_nonfinite (older files: a string).
                nonfinite = value in ("nan", "inf", "-inf") or (
                    value is None and f"{key}{NONFINITE}" in r)
                if key not in POSITION_KEYS and not key.endswith(NONFINITE) and (
                        numeric or nonfinite):
                    names.setdefault(key)
    series = {n: [r.get(n) for run in runs for r in run.of_kind("eval")] for n in names}

    def alias(n: str) -> bool:  # a primary figure shown under its set's name
        suffix = "_" + n.removeprefix("verification_")
        return any(m != n and m.endswith(suffix) and series[m] == series[n] for m in names)
    return [n for n in names if not alias(n)]


def batch_series(run: Run) -> Series:
    """Global batch size in effect at each applied logged step.

    From ``plan.json`` and the plan changes that set a batch (``grow_batch`` on a plateau,
    ``adapt`` of ``batch.adapt=goodput``; a change logged at step s holds
    from step s + 1); without a plan, the samples each step added (mean over unlogged steps).
    """
    train = [r for r in run.of_kind("train") if r.get("applied", True)]
    steps = [float(r["step"]) for r in train]
    if run.plan is not None and "global_size" in run.plan:
        grows = sorted((c["step"], c["global_size"]) for c in run.of_kind("plan_change")
                       if c.get("action") in ("grow_batch", "adapt"))
        sizes = []
        for r in train:
            size = run.plan["global_size"]
            for at, grown in grows:
                if at < r["step"]:
                    size = grown
            sizes.append(float(size))
        return steps, sizes
    sizes, prev_step, prev_samples = [], 0, 0
    for r in train:
        sizes.append((r["samples"] - prev_samples) / max(1, r["step"] - prev_step))
        prev_step, prev_samples = r["step"], r["samples"]
    return steps, [float(s) for s in sizes]


def plan_marks(run: Run) -> dict[str, list[float]]:
    """Steps of the run's plan changes, per marker label "<run> <action>" (grow_batch,
    reduce_lr)."""
    marks: dict[str, list[float]] = {}
    for c in run.of_kind("plan_change"):
        marks.setdefault(f"{run.name} {c.get('action', 'plan_change')}", []).append(
            float(c["step"]))
    return marks


def _add_loss(figs: dict[str, Figure], run: Run, smooth: int) -> None:
    train = run.of_kind("train")
    loss = [number(r.get("loss")) for r in train]
    for suffix, (key, label) in X_AXES.items():
        fig = figs.setdefault(f"loss_vs_{suffix}", Figure(f"training loss vs {label}", label,
                                                          "training loss"))
        x = [number(r.get(key)) for r in train]
        fig.add(run.name, f"{run.name} raw", (x, loss))
        fig.add(run.name, f"{run.name} moving avg ({smooth})", (x, moving_average(loss, smooth)))


def _add_evals(figs: dict[str, Figure], run: Run, metrics: list[str]) -> None:
    evals = run.of_kind("eval")
    for metric in metrics:
        rows = [r for r in evals if metric in r]
        if not rows:
            continue
        for suffix, (key, label) in X_AXES.items():
            fig = figs.setdefault(f"{_file_safe(metric)}_vs_{suffix}",
                                  Figure(f"{metric} vs {label}", label, metric))
            fig.add(run.name, run.name, ([number(r.get(key)) for r in rows],
                                         [number(r[metric]) for r in rows]))


def _add_schedule(figs: dict[str, Figure], run: Run) -> None:
    train = run.of_kind("train")
    with_lr = [r for r in train if "lr" in r]
    fig = figs.setdefault("lr_vs_steps", Figure("learning rate vs optimizer step",
                                                "optimizer step", "learning rate"))
    fig.add(run.name, run.name, ([float(r["step"]) for r in with_lr],
                                 [number(r["lr"]) for r in with_lr]))
    fig = figs.setdefault("batch_size_vs_steps", Figure("global batch size vs optimizer step",
                                                        "optimizer step", "global batch size"))
    fig.add(run.name, run.name, batch_series(run))
    fig.steps.add(run.name)
    norms = [r for r in train if math.isfinite(number(r.get("grad_norm")))]
    if norms:
        fig = figs.setdefault("grad_norm_vs_steps", Figure("gradient norm vs optimizer step",
                                                           "optimizer step", "gradient norm"))
        fig.add(run.name, run.name, ([float(r["step"]) for r in norms],
                                     [number(r["grad_norm"]) for r in norms]))


def build_figures(runs: list[Run], smooth: int = DEFAULT_SMOOTH) -> dict[str, Figure]:
    """Every figure's data, keyed by PNG file stem (what :func:`write_pngs` draws, exactly)."""
    if smooth < 1:
        raise ConfigError(f"--smooth must be >= 1 (got {smooth})")
    figs: dict[str, Figure] = {}
    metrics = eval_metric_names(runs)
    for run in runs:
        if run.of_kind("train"):
            _add_loss(figs, run, smooth)
            _add_schedule(figs, run)
        _add_evals(figs, run, metrics)
    for run in runs:  # plan changes on every against-steps figure, skipped windows on the loss
        for stem, fig in figs.items():
            if stem.endswith("_vs_steps"):
                for label, xs in plan_marks(run).items():
                    fig.mark(run.name, label, xs)
        skips = [float(r["step"]) + 1 for r in run.of_kind("skip")]  # the dropped window's step
        if skips and "loss_vs_steps" in figs:
            figs["loss_vs_steps"].mark(run.name, f"{run.name} skip", skips)
    return figs


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- drawing ----------------------------------------------------------------------------------
LINE_STYLES = {"grow_batch": "--", "adapt": "-.", "reduce_lr": ":", "skip": (0, (1, 3))}


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: files only, never a window (servers, CI)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def run_colours(runs: list[Run]) -> dict[str, Any]:
    """One colour per run, the same in every figure."""
    cycle = pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {run.name: cycle[i % len(cycle)] for i, run in enumerate(runs)}


def render(fig_data: Figure, colours: dict[str, Any]) -> Any:
    """One matplotlib figure: every series in its run's colour, the markers as vertical
    lines, a legend with one entry per series and per marker kind."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    for label, (x, y) in fig_data.series.items():
        colour = colours[fig_data.owner[label]]
        if label in fig_data.steps:
            ax.step(x, y, where="post", color=colour, label=label)
            continue
        raw = label.endswith(" raw")  # the raw loss under its moving average: lighter
        ax.plot(x, y, color=colour, alpha=0.35 if raw else 1.0, lw=1.0 if raw else 1.8,
                marker="o" if len(x) < 30 else None, ms=3, label=label)
    for label, xs in fig_data.vlines.items():
        action = label.rpartition(" ")[2]
        for i, x in enumerate(xs):
            ax.axvline(x, color=colours[fig_data.owner[label]], lw=0.9, alpha=0.7,
                       ls=LINE_STYLES.get(action, "-."), label=label if i == 0 else "_nolegend_")
    ax.set_title(fig_data.title)
    ax.set_xlabel(fig_data.xlabel)
    ax.set_ylabel(fig_data.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    # Fixed margins instead of tight_layout: the same look here, at a fraction of the time.
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    return fig


def write_pngs(figs: dict[str, Figure], runs: list[Run], out: Path) -> list[Path]:
    """Draw every figure into ``out`` (created) as ``<stem>.png``; returns the paths written."""
    plt, colours = pyplot(), run_colours(runs)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, fig_data in figs.items():
        fig = render(fig_data, colours)
        paths.append(out / f"{stem}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
