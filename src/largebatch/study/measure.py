"""The study's measurements: a run's metrics.jsonl and summary turned into report-row fields.

Pure functions of the records a run wrote (unit-testable without training): the timing
passes extrapolated to an epoch, the loss oscillation, time / updates / epochs to the target,
how the convergence run ended and its gradient noise scale B_simple across training.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from largebatch.io import iter_jsonl, json_number
from largebatch.plan import BatchPlan
from largebatch.study.sweep import RunSpec, Sweep


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (a torn last line dropped; a non-finite number is
    null beside its ``KEY_nonfinite``, which ``io.json_number`` reads).

    Raises:
        FileNotFoundError: the run wrote no metrics.jsonl (a run the study made always does).
    """
    return list(iter_jsonl(Path(out_dir) / "metrics.jsonl"))


def loss_oscillation(losses: list[float]) -> float:
    """Mean absolute change of the loss between successive iterations (finite pairs only)."""
    diffs = [abs(b - a) for a, b in zip(losses, losses[1:])
             if math.isfinite(a) and math.isfinite(b)]
    return sum(diffs) / len(diffs) if diffs else math.nan


def timing_columns(records: list[dict[str, Any]], plan: BatchPlan, loader: str) -> dict:
    """A timing pass's epoch record, extrapolated from the micro-batches run to a whole epoch."""
    epochs = [r for r in records if r["kind"] == "epoch"]
    timed = sum(r["micro_batches"] for r in epochs)
    if not timed:
        raise RuntimeError(f"timing pass with loader {loader} ran no micro-batch")
    scale = plan.micro_batches_per_epoch / timed
    total = {k: sum(json_number(r, k) for r in epochs) * scale
             for k in ("epoch_time_s", "data_time_s", "compute_time_s")}
    return {f"{loader}_epoch_time_s": total["epoch_time_s"],
            f"{loader}_data_time_s": total["data_time_s"],
            f"{loader}_compute_time_s": total["compute_time_s"],
            f"{loader}_timed_fraction": timed / plan.micro_batches_per_epoch}


def outcome(summary: dict[str, Any], sweep: Sweep) -> str:
    """How the convergence run ended, in words (honest about budgets)."""
    if summary["reached_target"]:
        return (f"reached {sweep.target_acc:.0%} in {summary['epochs_to_target']:.2f} epochs, "
                f"{summary['time_to_target_s']:.1f} s")
    reason = summary["stop_reason"]
    if summary["diverged"]:
        return f"diverged at step {summary['steps']} (epoch {summary['epochs_run']:.2f})"
    if reason == "time_budget":
        return f"not reached within budget ({sweep.budget_s:g} s)"
    if reason == "epochs":
        return f"not reached within {sweep.max_epochs:g} epochs"
    if not sweep.target_acc:
        return f"no target; stopped ({reason})"
    return f"not reached ({reason})"


def convergence_columns(summary: dict[str, Any], records: list[dict[str, Any]],
                        spec: RunSpec, sweep: Sweep,
                        metric: str = "val_acc") -> tuple[dict, list[float], list[dict]]:
    """Row fields of a convergence run, its first ``loss_iters`` losses and its eval curve.

    ``metric`` is the accuracy the target follows (the task's primary metric: ``val_acc`` on
    MNIST, ``verification_acc`` on faces); its values fill the ``*_val_acc`` fields."""
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    losses = [json_number(r, "loss") for r in train[:sweep.loss_iters]]
    evals = [{"step": r["step"], "epoch": r["epoch"], "samples": r["samples"],
              "time_s": r["time_s"], "val_acc": json_number(r, metric),
              "val_loss": json_number(r, "val_loss")} for r in records if r["kind"] == "eval"]
    full = [r for r in records if r["kind"] == "epoch"
            and r["micro_batches"] == spec.plan.micro_batches_per_epoch]
    accs = [e["val_acc"] for e in evals if math.isfinite(e["val_acc"])]
    # the worst step of the run
    spike = max(train, key=lambda r: json_number(r, "loss"), default=None)
    cols = {
        "arm": spec.arm, "batch_size": spec.batch_size, "status": "ran", "note": "",
        "world_size": spec.plan.world_size, "micro_size": spec.plan.micro_size,
        "lr": spec.plan.peak_lr, "steps_per_epoch": spec.plan.steps_per_epoch,
        "epochs_run": summary["epochs_run"], "steps": summary["steps"],
        "train_time_s": summary["train_time_s"], "wall_s": summary["wall_s"],
        "run_epoch_time_s": (sum(json_number(r, "epoch_time_s") for r in full) / len(full))
        if full else math.nan,
        "run_full_epochs": len(full),
        "loss_osc_1000": loss_oscillation(losses), "loss_iters_used": len(losses),
        "reached_target": bool(summary["reached_target"]),
        "time_to_target_s": summary["time_to_target_s"],
        "steps_to_target": summary["steps_to_target"],
        "epochs_to_target": summary["epochs_to_target"],
        "final_val_acc": json_number(summary, f"final_{metric}"),
        "best_val_acc": max(accs) if accs else math.nan,
        "final_val_loss": json_number(summary, "final_val_loss"),
        "final_lr": json_number(summary, "final_lr"),  # where a plateau arm left the LR
        "diverged": bool(summary["diverged"]),
        "diverged_step": summary["steps"] if summary["diverged"] else None,
        "max_train_loss": json_number(spike, "loss") if spike else math.nan,
        "max_loss_step": spike["step"] if spike else None,
        "stop_reason": summary["stop_reason"], "outcome": outcome(summary, sweep),
    }
    return cols, losses, evals


NOISE_CURVE_POINTS = 200  # B_simple samples kept per run for the figure (evenly by step)
NOISE_EARLY = 0.1  # "early" B_simple: over the first 10% of the logged steps


def pooled_noise_scale(records: list[dict[str, Any]]) -> float:
    """mean(grad_trace_cov) / mean(grad_sq_norm) over ``records`` (NaN: no positive |G|²).

    The numerator and denominator are averaged separately, as the EMAs themselves are: a
    median or mean of per-step ratios is biased where |G|² is small and noisy (small batches:
    at batch 6 about a quarter of the steps have an EMA'd |G|² <= 0, hence no ratio at all).
    """
    pairs = [(json_number(r, "grad_trace_cov"), json_number(r, "grad_sq_norm"))
             for r in records]
    pairs = [(t, g) for t, g in pairs if math.isfinite(t) and math.isfinite(g)]
    if not pairs:
        return math.nan
    g2 = sum(g for _, g in pairs) / len(pairs)
    return sum(t for t, _ in pairs) / len(pairs) / g2 if g2 > 0 else math.nan


def noise_columns(records: list[dict[str, Any]], enabled: bool) -> tuple[dict, list[dict]]:
    """B_simple of a convergence run from its train records (the trainer's EMA'd estimate).

    Returns the row fields (early: ``pooled_noise_scale`` of the first ``NOISE_EARLY`` of the
    train records, late: of their last half, final: the last noise_scale logged; NaN where the
    run did not measure it) and the curve (the logged EMA'd noise_scale): at most
    ``NOISE_CURVE_POINTS`` records, evenly spaced by index, the last one always included.
    """
    off = {"noise_scale_early": math.nan, "noise_scale_late": math.nan,
           "noise_scale_final": math.nan, "noise_points": 0}
    if not enabled:
        return off, []
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    values = [json_number(r, "noise_scale") for r in train]
    if not train:
        return off, []
    n = len(train)
    early = train[:max(1, math.ceil(NOISE_EARLY * n))]
    # The EMA'd |G|² can sit at or below 0 at a small batch (the estimate is then None): the
    # final value is the last one logged, not necessarily the last step's.
    logged = [v for v in values if math.isfinite(v)]
    cols = {"noise_scale_early": pooled_noise_scale(early),
            "noise_scale_late": pooled_noise_scale(train[n // 2:]),
            "noise_scale_final": logged[-1] if logged else math.nan,
            "noise_points": sum(1 for v in values if math.isfinite(v))}
    stride = max(1, math.ceil(n / NOISE_CURVE_POINTS))
    picks = sorted(set(range(n - 1, -1, -stride)))
    curve = [{"step": train[i]["step"], "samples": train[i]["samples"],
              "epoch": train[i]["epoch"], "noise_scale": values[i]} for i in picks]
    return cols, curve


def primary_timing(row: dict, loader: str, loaders: list[str]) -> dict:
    """The generic epoch/data/compute columns: the convergence run's loader when timed."""
    src = loader if loader in loaders else loaders[0]
    return {"epoch_time_s": row[f"{src}_epoch_time_s"], "data_time_s": row[f"{src}_data_time_s"],
            "compute_time_s": row[f"{src}_compute_time_s"], "timing_loader": src}


def skipped_row(arm: str, batch_size: int, note: str, world_size: int) -> dict:
    """A row for a batch size the launch cannot run (reported, not silently dropped)."""
    return {"arm": arm, "batch_size": batch_size, "status": "skipped", "note": note,
            "world_size": world_size}
