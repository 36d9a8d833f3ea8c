"""The study's report: CSV/JSON tables, PNG figures and ``study.md`` with the claims judged.

The verdicts are computed in ``verdicts`` and the figures drawn in ``figures``; this module
writes the tables and ``study.md`` and puts the files together (``write_report``).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional

from largebatch.study._util import fmt as _fmt
from largebatch.study._util import finite, results_table
from largebatch.study.figures import (plot_accuracy, plot_epoch_time, plot_loss_first,
                                      plot_noise_scale, plot_time_to_target)
from largebatch.study.noise_verdict import PAYING, stop_paying
from largebatch.study.verdicts import (DATA_DOMINATES, MANY_MORE_EPOCHS, TIME_TOL, Verdict,
                                       reference_arm, verdicts)

BASE_COLUMNS = [
    "arm", "batch_size", "status", "lr", "world_size", "micro_size", "accum_steps",
    "timing_micro_size", "timing_accum_steps", "steps_per_epoch",
    "epochs_run", "steps", "train_time_s", "wall_s",
    "epoch_time_s", "data_time_s", "compute_time_s", "timing_loader",
]
TAIL_COLUMNS = [
    "run_epoch_time_s", "run_full_epochs", "loss_osc_1000", "loss_iters_used",
    "reached_target", "time_to_target_s", "steps_to_target", "epochs_to_target",
    "final_val_acc", "best_val_acc", "final_val_loss", "final_lr", "diverged", "diverged_step",
    "max_train_loss", "max_loss_step",
    "noise_scale_early", "noise_scale_late", "noise_scale_final", "noise_points",
    "stop_reason", "outcome", "note",
]
LOADER_FIELDS = ("epoch_time_s", "data_time_s", "compute_time_s", "timed_fraction")


def columns(loaders: Iterable[str]) -> list[str]:
    """The CSV/JSON columns: the common ones, then per-loader timings, then the outcome."""
    per_loader = [f"{ld}_{f}" for ld in loaders for f in LOADER_FIELDS]
    return BASE_COLUMNS + per_loader + TAIL_COLUMNS


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- tables ----------------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict], cols: list[str]) -> None:
    """One row per arm x batch size; missing or non-finite values are empty cells."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if _json_value(row.get(c)) is None else row.get(c)
                             for c in cols})


def write_json(path: Path, obj: Any, indent: Optional[int] = 1) -> None:
    """JSON with NaN/inf written as null (valid JSON for any reader)."""
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return _json_value(o)
    path.write_text(json.dumps(clean(obj), indent=indent) + "\n")


# ---- study.md --------------------------------------------------------------------------------


def _timing_cell(r: dict, loader: str) -> str:
    e, d, c = (r.get(f"{loader}_{k}") for k in ("epoch_time_s", "data_time_s", "compute_time_s"))
    if not finite(e):
        return "—"
    return f"{e:.3g} = {d:.2g} + {c:.3g}"


def _noise_cell(r: dict) -> str:
    """B_simple early -> late; 'n/a' where the run had no smaller batch to measure it with."""
    early, late = r.get("noise_scale_early"), r.get("noise_scale_late")
    if not finite(late):
        return "n/a"
    return f"{_fmt(early, '.3g')} → {late:.3g}"


def markdown_table(rows: list[dict], loaders: list[str]) -> str:
    """The results table of study.md (the CSV has every column)."""
    head = (["arm", "batch", "lr", "epochs run"]
            + [f"epoch s, {ld} (data + compute)" for ld in loaders]
            + ["loss osc", "target", "time to target s", "updates to target",
               "epochs to target", "final acc", "final lr", "B_simple (early → late)",
               "outcome"])
    return results_table(head, rows, lambda r: (
        [r["arm"], str(r["batch_size"]), _fmt(r["lr"], "g"), _fmt(r["epochs_run"], ".2f")]
        + [_timing_cell(r, ld) for ld in loaders]
        + [_fmt(r["loss_osc_1000"], ".3g"), _fmt(r["reached_target"]),
           _fmt(r["time_to_target_s"], ".3g"), _fmt(r["steps_to_target"], "d"),
           _fmt(r["epochs_to_target"], ".2f"), _fmt(r["final_val_acc"], ".4f"),
           _fmt(r.get("final_lr"), ".3g"), _noise_cell(r), r["outcome"]]))


def _noise_setup_line(meta: dict, rows: list[dict]) -> str:
    if not meta["sweep"].get("noise_scale"):
        return "- Gradient noise scale: off (study.noise_scale=false)."
    how = ("each rank's window is the small batch (micro B/world x accum 1)"
           if meta["world_size"] > 1 else "one process: batch B >= 2 runs as micro B/p x accum "
           "p (p the smallest prime factor of B: B/2 x 2 when even), the window's micro-batches "
           "being the small batches; batch 1 has none (n/a)")
    return ("- Gradient noise scale B_simple = tr(Σ)/|G|² (`train.noise_scale`, EMA'd, logged "
            f"every update) in the convergence runs: {how}. Same global batch, LR and updates; "
            "the timing passes run micro B x accum 1 without it, so Claim A is unaffected, but "
            "the convergence runs' times (Claim C) include the measurement. Early / late: "
            "mean tr(Σ) / mean |G|² of the EMAs over the first 10% / the last half of the "
            "updates (the figure: the EMA'd B_simple itself).")


def _setup_lines(meta: dict, rows: list[dict]) -> list[str]:
    sw, env, tm = meta["sweep"], meta["environment"], meta["timing"]
    arms = ", ".join(f"`{a}`" for a in dict.fromkeys(r["arm"] for r in rows))
    lines = [
        f"- Command: `{meta['command']}`",
        f"- Total wall time: **{meta['wall_s'] / 60:.1f} min** ({meta['wall_s']:.0f} s), "
        f"finished {meta['finished']}; world size {meta['world_size']}.",
        f"- Machine: {env['processor']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
        f"intra-op threads: {env['torch_threads']}" + (f", GPU {env['cuda']}" if env['cuda'] else
                                                      ", CPU only") + ".",
        f"- Arms: {arms}; claims are judged on `{reference_arm(rows)}`.",
        f"- Sweep: batch sizes {sw['batch_sizes']}; per (arm, batch size) at most "
        f"{sw['max_epochs']:g} epochs and {sw['budget_s']:g} s of training time; target "
        f"{sw['target_acc']:.0%} test accuracy; evaluation every "
        + (f"{sw['eval_every_samples']} training samples" if sw["eval_every_samples"] else
           "epoch") + f" on the {sw['test_subset'] or 10000}-sample test split, excluded from "
        "every time reported.",
        f"- Epoch timings (Claim A): one timing pass per loader and batch size, at least "
        f"{tm['samples']} samples and {tm['min_steps']} updates, at most one epoch, without "
        "progress bar or per-step logging; the data-wait and compute seconds are extrapolated "
        "linearly to a whole epoch (`*_timed_fraction` in the CSV says how much was measured). "
        "`run_epoch_time_s` is the convergence run's own full-epoch time (with per-step logging "
        "and the progress bar), as a cross-check.",
        _noise_setup_line(meta, rows),
        f"- Loss oscillation (Claim B): mean |loss(t+1) - loss(t)| over the first "
        f"{sw['loss_iters']} iterations (or all there are), the batch-mean training loss"
        + (" of rank 0" if meta["world_size"] > 1 else "") + ".",
    ]
    if sw.get("quick"):
        lines.insert(0, f"- **Quick mode**: the first {sw['subset']} training samples, batch "
                        f"sizes {sw['batch_sizes']}, target {sw['target_acc']:.0%}: a smoke test "
                        "of the pipeline, not the study's answer.")
    return lines


def _stop_paying_lines(v: Verdict, arm: Optional[str]) -> list[str]:
    out = ["## Where batch sizes stop paying (gradient noise scale)", "",
           "![B_simple across training](noise_scale.png)", "",
           f"### Arm `{arm}`: **{v.verdict}**", "", f"> {v.statement}", ""]
    out += [f"- {part}: **{verdict}** — {why}" for part, verdict, why in v.parts]
    out += [f"- {line}" for line in v.extra]
    out += ["", f"A step between two batch sizes \"pays\" when the updates to the target fall "
            f"by >= {PAYING:.0%} of the ideal factor (B2/B1); \"more epochs\" means > "
            f"{TIME_TOL:.0%} more.", ""]
    return out


def markdown(rows: list[dict], meta: dict, judged: list[Verdict], loaders: list[str],
             paying: Optional[Verdict] = None) -> str:
    """study.md: set-up, table, figures, and each claim with its verdict and reasons."""
    out = ["# MNIST batch-size study", ""] + _setup_lines(meta, rows)
    out += ["", "## Results", "", markdown_table(rows, loaders), "",
            "Epoch cells: seconds per epoch = data wait + compute (the rest is loop overhead).",
            "", "## Figures", "",
            "![epoch time: data vs compute](epoch_time.png)", "",
            "![loss over the first iterations](loss_first_1000.png)", "",
            "![time and epochs to target](time_to_target.png)", "",
            "![test error vs training time](accuracy.png)", "", "## Claims", ""]
    for v in judged:
        out += [f"### Claim {v.claim} ({v.title}): **{v.verdict}**", "", f"> {v.statement}", ""]
        out += [f"- {part}: **{verdict}** — {why}" for part, verdict, why in v.parts]
        out += [f"- {line}" for line in v.extra]
        out.append("")
    out += [f"Thresholds: timings within {TIME_TOL:.0%} count as not rising; loading "
            f"\"dominates\" at >= {DATA_DOMINATES:.0%} of the epoch; \"many more epochs\" is >= "
            f"{MANY_MORE_EPOCHS:g}x the fastest batch size's epochs to target.", ""]
    if paying is not None:
        out += _stop_paying_lines(paying, reference_arm(rows))
    notes = list(meta.get("notes", [])) + sorted({r["note"] for r in rows
                                                  if r.get("status") != "ran" and r.get("note")})
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, rows: list[dict], curves: dict, evals: dict,
                 meta: dict, noise: Optional[dict] = None) -> dict[str, Path]:
    """Write study.csv/json, loss/eval/noise curves (JSON), the PNGs and study.md.

    ``noise``: {arm: {batch size: [{step, samples, epoch, noise_scale}, ...]}} (B_simple
    across each convergence run); None or empty: no noise figure or section.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaders = list(meta["sweep"]["loaders"])
    target = meta["sweep"]["target_acc"]
    cols = columns(loaders)
    judged = verdicts(rows, loaders, target)
    paths = {name: out_dir / f for name, f in [
        ("csv", "study.csv"), ("json", "study.json"), ("md", "study.md"),
        ("loss_curves", "loss_curves.json"), ("eval_curves", "eval_curves.json"),
        ("epoch_time", "epoch_time.png"), ("loss_first", "loss_first_1000.png"),
        ("time_to_target", "time_to_target.png"), ("accuracy", "accuracy.png")]}
    ref = reference_arm(rows)
    noise = {a: c for a, c in (noise or {}).items() if any(c.values())}  # arms that measured
    paying = stop_paying(rows, ref) if noise and ref is not None else None
    write_csv(paths["csv"], rows, cols)
    write_json(paths["json"], {"meta": meta, "columns": cols,
                               "rows": [{c: r.get(c) for c in cols} for r in rows],
                               "verdicts": [{"claim": v.claim, "verdict": v.verdict,
                                             "parts": v.parts} for v in judged],
                               "stop_paying": None if paying is None else {
                                   "verdict": paying.verdict, "parts": paying.parts,
                                   "lines": paying.extra}})
    write_json(paths["loss_curves"], curves, indent=None)  # thousands of numbers: compact
    write_json(paths["eval_curves"], evals, indent=None)
    if noise:
        paths["noise_curves"] = out_dir / "noise_curves.json"
        paths["noise_scale"] = out_dir / "noise_scale.png"
        write_json(paths["noise_curves"], noise, indent=None)
        plot_noise_scale(paths["noise_scale"], rows, noise)
    if ref is not None:
        plot_epoch_time(paths["epoch_time"], rows, ref, loaders)
        plot_loss_first(paths["loss_first"], rows, curves, ref)
    plot_time_to_target(paths["time_to_target"], rows, target)
    plot_accuracy(paths["accuracy"], rows, evals, target)
    paths["md"].write_text(markdown(rows, meta, judged, loaders, paying))
    return paths
