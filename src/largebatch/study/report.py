"""The study's report: CSV/JSON tables, PNG figures and ``study.md`` with the claims judged.

Every verdict is computed here from the rows of this run (pure functions, unit-tested on
synthetic rows): a claim is split into parts, each part "holds", "does not hold" or is "not
tested" (e.g. batch 1 is not in a quick sweep), with the numbers that decided it.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

HOLDS, PARTLY, FAILS, UNTESTED = "holds", "partly holds", "does not hold", "not tested"
TIME_TOL = 0.10  # timings within 10% count as "not rising" (noise of a shared CPU)
DATA_DOMINATES = 0.5  # data loading "dominates" at >= 50% of the epoch
MANY_MORE_EPOCHS = 2.0  # "many more epochs": at least this factor over the fastest batch
CLAIM_C_FASTEST = (6, 60)  # the claim's batch-size range of least time to target

BASE_COLUMNS = [
    "arm", "batch_size", "status", "lr", "world_size", "micro_size", "steps_per_epoch",
    "epochs_run", "steps", "train_time_s", "wall_s",
    "epoch_time_s", "data_time_s", "compute_time_s", "timing_loader",
]
TAIL_COLUMNS = [
    "run_epoch_time_s", "run_full_epochs", "loss_osc_1000", "loss_iters_used",
    "reached_target", "time_to_target_s", "steps_to_target", "epochs_to_target",
    "final_val_acc", "best_val_acc", "final_val_loss", "final_lr", "diverged", "diverged_step",
    "stop_reason", "outcome", "note",
]
LOADER_FIELDS = ("epoch_time_s", "data_time_s", "compute_time_s", "timed_fraction")
LOADER_NAMES = {"torch": "torch DataLoader + ToTensor + Normalize",
                "memory": "in-memory tensor, sliced by index"}


def columns(loaders: Iterable[str]) -> list[str]:
    """The CSV/JSON columns: the common ones, then per-loader timings, then the outcome."""
    per_loader = [f"{ld}_{f}" for ld in loaders for f in LOADER_FIELDS]
    return BASE_COLUMNS + per_loader + TAIL_COLUMNS


def finite(value: Any) -> bool:
    """True for a real, finite number (not None, NaN, inf or a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


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


# ---- verdicts --------------------------------------------------------------------------------


@dataclass
class Verdict:
    """One claim, its parts and the overall verdict computed from them."""

    claim: str
    title: str
    statement: str
    parts: list[tuple[str, str, str]] = field(default_factory=list)  # (part, verdict, why)
    extra: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """holds if every tested part holds, does not hold if none does, else partly."""
        tested = [v for _, v, _ in self.parts if v != UNTESTED]
        if not tested:
            return UNTESTED
        if all(v == HOLDS for v in tested):
            return HOLDS
        if not any(v == HOLDS for v in tested):
            return FAILS
        return PARTLY


def arm_rows(rows: list[dict], arm: str) -> list[dict]:
    """The rows of ``arm`` that ran, by batch size."""
    return sorted((r for r in rows if r["arm"] == arm and r.get("status") == "ran"),
                  key=lambda r: r["batch_size"])


def reference_arm(rows: list[dict]) -> Optional[str]:
    """The arm the claims are about: 'seed' when present, else the first arm."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    return "seed" if "seed" in arms else (arms[0] if arms else None)


def _series(rows: list[dict], key: str) -> str:
    return ", ".join(f"{_fmt(r[key])} (bs {r['batch_size']})" for r in rows)


def _first_rise(rows: list[dict], key: str, tol: float) -> Optional[tuple[dict, dict]]:
    for a, b in zip(rows, rows[1:]):
        if b[key] > a[key] * (1 + tol):
            return a, b
    return None


def _epoch_time_part(pts: list[dict], loader: str) -> tuple[str, str, str]:
    e, d = f"{loader}_epoch_time_s", f"{loader}_data_time_s"
    name = f"epoch time falls with the batch until loading dominates ({loader} loader)"
    dom = next((i for i, r in enumerate(pts) if r[d] >= DATA_DOMINATES * r[e]), None)
    region = pts if dom is None else pts[:dom + 1]
    if dom is None:
        r = max(pts, key=lambda r: r[d] / r[e])
        where = (f"loading never dominates (largest share {r[d] / r[e]:.0%} at bs "
                 f"{r['batch_size']})")
    else:
        where = (f"loading dominates from bs {pts[dom]['batch_size']} "
                 f"({pts[dom][d] / pts[dom][e]:.0%} of the epoch)")
        if dom + 1 < len(pts):
            last = pts[-1]
            where += (f"; after that the epoch takes {last[e]:.3g} s at bs {last['batch_size']} "
                      f"({last[e] / pts[dom][e] - 1:+.0%})")
    if len(region) < 2:
        return name, UNTESTED, f"{where}: nothing left to fall. Epoch s: {_series(pts, e)}"
    rise = _first_rise(region, e, TIME_TOL)
    if rise is None and region[-1][e] < region[0][e]:
        why = (f"{region[0][e]:.3g} s at bs {region[0]['batch_size']} -> {region[-1][e]:.3g} s "
               f"at bs {region[-1]['batch_size']}; {where}. Epoch s: {_series(pts, e)}")
        return name, HOLDS, why
    a, b = rise or (region[0], region[-1])
    return name, FAILS, (f"rises from {a[e]:.3g} s (bs {a['batch_size']}) to {b[e]:.3g} s "
                         f"(bs {b['batch_size']}) before loading dominates; {where}. "
                         f"Epoch s: {_series(pts, e)}")


def _compute_part(pts: list[dict], loader: str) -> tuple[str, str, str]:
    c = f"{loader}_compute_time_s"
    name = f"pure compute time keeps falling ({loader} loader)"
    rise = _first_rise(pts, c, TIME_TOL)
    if rise is None and pts[-1][c] < pts[0][c]:
        return name, HOLDS, f"compute s per epoch: {_series(pts, c)}"
    a, b = rise or (pts[0], pts[-1])
    return name, FAILS, (f"compute per epoch rises from {a[c]:.3g} s (bs {a['batch_size']}) to "
                         f"{b[c]:.3g} s (bs {b['batch_size']}); compute s: {_series(pts, c)}")


def claim_a(rows: list[dict], arm: str, loaders: list[str]) -> Verdict:
    """Claim A (speed), judged per loader from the extrapolated epoch timings."""
    v = Verdict("A", "speed", "The time of an epoch falls as the batch grows (fewer iterations), "
                "until loading the data dominates; the pure compute time keeps falling.")
    for loader in loaders:
        pts = [r for r in arm_rows(rows, arm) if finite(r.get(f"{loader}_epoch_time_s"))
               and r[f"{loader}_epoch_time_s"] > 0]
        if len(pts) < 2:
            v.parts.append((f"epoch time vs batch ({loader} loader)", UNTESTED,
                            "fewer than two batch sizes were timed"))
            continue
        v.parts += [_epoch_time_part(pts, loader), _compute_part(pts, loader)]
    return v


def _oscillation_part(pts: list[dict]) -> tuple[str, str, str]:
    name = "the smaller the batch, the more the loss oscillates (first iterations)"
    pts = [r for r in pts if finite(r.get("loss_osc_1000"))]
    if len(pts) < 2:
        return name, UNTESTED, "fewer than two batch sizes have a loss curve"
    series = ", ".join(f"{r['loss_osc_1000']:.4g} (bs {r['batch_size']}, "
                       f"{r['loss_iters_used']} it.)" for r in pts)
    rise = next(((a, b) for a, b in zip(pts, pts[1:])
                 if not b["loss_osc_1000"] < a["loss_osc_1000"]), None)
    if rise is None:
        return name, HOLDS, f"mean |loss change| per iteration falls strictly: {series}"
    a, b = rise
    return name, FAILS, (f"it does not fall from bs {a['batch_size']} to bs {b['batch_size']}: "
                         f"{series}")


def _blow_up_part(pts: list[dict]) -> tuple[str, str, str]:
    name = "at batch 1 the loss blows up later in training"
    one = next((r for r in pts if r["batch_size"] == 1), None)
    if one is None:
        return name, UNTESTED, "batch 1 is not in this sweep"
    lr = f"lr {_fmt(one.get('lr'), 'g')}"
    if one.get("diverged"):
        return name, HOLDS, (f"{lr}: the loss became non-finite or exceeded train.max_loss at "
                             f"update {one.get('diverged_step')} (epoch "
                             f"{_fmt(one.get('epochs_run'), '.2f')}); reported, not crashed on")
    return name, FAILS, (f"{lr}: no blow-up in {one.get('steps')} updates "
                         f"({_fmt(one.get('epochs_run'), '.2f')} epochs; {one.get('outcome')})")


def claim_b(rows: list[dict], arm: str) -> Verdict:
    """Claim B (smoothness): oscillation falls with the batch; batch 1 blows up."""
    v = Verdict("B", "smoothness", "Over the first 1000 iterations, the smaller the batch, the "
                "more the loss oscillates; at batch 1 and lr 0.02 the loss blows up later in "
                "training (an outlier sample with too large an LR).")
    pts = arm_rows(rows, arm)
    v.parts += [_oscillation_part(pts), _blow_up_part(pts)]
    return v


def _fastest(pts: list[dict]) -> Optional[dict]:
    reached = [r for r in pts if r.get("reached_target") and finite(r.get("time_to_target_s"))]
    return min(reached, key=lambda r: r["time_to_target_s"]) if reached else None


def _describe_reach(r: dict) -> str:
    return (f"bs {r['batch_size']}: {r['time_to_target_s']:.3g} s, {r['steps_to_target']} "
            f"updates, {r['epochs_to_target']:.2f} epochs")


def _large_batch_part(pts: list[dict], best: Optional[dict]) -> tuple[str, str, str]:
    name = "very large batches need many more epochs (limited by the number of updates)"
    large = pts[-1] if pts else None
    if large is None or best is None:
        return name, UNTESTED, "no batch size reached the target to compare with"
    if large is best:
        return name, FAILS, f"the largest batch ({_describe_reach(large)}) is the fastest"
    osc = [r for r in pts if finite(r.get("loss_osc_1000"))]
    smooth = (f"; its loss is the smoothest of the sweep (osc {large['loss_osc_1000']:.3g})"
              if osc and min(osc, key=lambda r: r["loss_osc_1000"]) is large else "")
    need = MANY_MORE_EPOCHS * best["epochs_to_target"]
    if large.get("reached_target"):
        ratio = large["epochs_to_target"] / best["epochs_to_target"]
        why = (f"{_describe_reach(large)} = {ratio:.1f}x the epochs of {_describe_reach(best)}"
               f"{smooth}")
        return name, HOLDS if ratio >= MANY_MORE_EPOCHS else FAILS, why
    ran = (f"bs {large['batch_size']} did not reach it in {large['epochs_run']:.2f} epochs "
           f"({large['steps']} updates; {large['outcome']})")
    if large["epochs_run"] >= need:
        return name, HOLDS, (f"{ran}, >= {MANY_MORE_EPOCHS:g}x the {best['epochs_to_target']:.2f}"
                             f" epochs ({best['steps_to_target']} updates) of bs "
                             f"{best['batch_size']}{smooth}")
    return name, UNTESTED, f"{ran}: stopped before {MANY_MORE_EPOCHS:g}x the epochs of the fastest"


def claim_c(rows: list[dict], arm: str, target: float) -> Verdict:
    """Claim C (convergence): the fastest batch to the target, batch 1, the largest batch."""
    v = Verdict("C", "convergence", f"To reach ~{target:.0%} test accuracy, batch 6-60 take the "
                f"least total time; batch 1 never reaches {target:.0%}; very large batches need "
                f"many more epochs (the number of updates, not the gradient's stability, limits "
                f"them).")
    pts = arm_rows(rows, arm)
    best = _fastest(pts)
    lo, hi = CLAIM_C_FASTEST
    name = f"batch {lo}-{hi} reaches the target in the least time"
    if best is None:
        v.parts.append((name, FAILS, f"no batch size reached {target:.0%}"))
    else:
        others = [_describe_reach(r) for r in pts if r.get("reached_target") and r is not best]
        why = f"fastest {_describe_reach(best)}" + (f"; then {'; '.join(others)}" if others
                                                    else "; no other batch size reached it")
        v.parts.append((name, HOLDS if lo <= best["batch_size"] <= hi else FAILS, why))
    one = next((r for r in pts if r["batch_size"] == 1), None)
    name1 = f"batch 1 never reaches {target:.0%}"
    if one is None:
        v.parts.append((name1, UNTESTED, "batch 1 is not in this sweep"))
    elif one.get("reached_target"):
        v.parts.append((name1, FAILS, f"it did: {_describe_reach(one)}"))
    else:
        v.parts.append((name1, HOLDS, f"{one['outcome']} (best val acc "
                        f"{_fmt(one.get('best_val_acc'), '.4f')} in "
                        f"{one['epochs_run']:.2f} epochs)"))
    v.parts.append(_large_batch_part(pts, best))
    return v


def other_arm_lines(rows: list[dict], ref: str, target: float) -> list[str]:
    """One line per other arm: its fastest batch size to the target (shown, not judged)."""
    lines = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        if arm == ref:
            continue
        pts = arm_rows(rows, arm)
        best = _fastest(pts)
        reached = [str(r["batch_size"]) for r in pts if r.get("reached_target")]
        lines.append(f"arm `{arm}`: " + (f"fastest to {target:.0%}: {_describe_reach(best)}; "
                                        f"reached at bs {', '.join(reached)}" if best else
                                        f"no batch size reached {target:.0%}"))
    return lines


def verdicts(rows: list[dict], loaders: list[str], target: float) -> list[Verdict]:
    """Claims A-C judged on the reference arm's rows."""
    ref = reference_arm(rows)
    if ref is None:
        return []
    out = [claim_a(rows, ref, loaders), claim_b(rows, ref), claim_c(rows, ref, target)]
    out[2].extra = other_arm_lines(rows, ref, target)
    return out


# ---- figures ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window (servers, CI, torchrun ranks)
    import matplotlib.pyplot as plt
    return plt


def _batch_axis(ax: Any, sizes: list[int]) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.grid(True, which="both", alpha=0.3)


def _log_ticks(axis: Any) -> None:
    """Readable log ticks (1, 2, 5 per decade, plain numbers), even within one decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_epoch_time(path: Path, rows: list[dict], ref: str, loaders: list[str]) -> None:
    """Data wait vs compute per batch size, one panel per loader, log-log."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(loaders)), figsize=(5.2 * max(1, len(loaders)), 4.2),
                             sharey=True, squeeze=False)
    styles = [("epoch_time_s", "epoch (training only)", "black", "o"),
              ("data_time_s", "waiting for data", "tab:orange", "s"),
              ("compute_time_s", "compute (fwd+bwd+step)", "tab:blue", "^")]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    others = dict(zip([a for a in arms if a != ref], ["tab:green", "tab:purple", "tab:brown",
                                                      "tab:pink", "tab:olive", "tab:cyan"]))
    for ax, loader in zip(axes[0], loaders):
        for arm in arms:
            pts = [r for r in arm_rows(rows, arm) if finite(r.get(f"{loader}_epoch_time_s"))]
            if not pts:
                continue
            xs = [r["batch_size"] for r in pts]
            for key, label, color, marker in styles:
                if arm != ref and key != "compute_time_s":
                    continue  # other arms differ only in the optimizer step: show their compute
                ys = [max(r[f"{loader}_{key}"], 1e-4) for r in pts]
                ax.plot(xs, ys, marker=marker if arm == ref else None,
                        color=color if arm == ref else others.get(arm, "gray"),
                        linestyle="-" if arm == ref else ":", alpha=1 if arm == ref else 0.7,
                        label=label if arm == ref else f"compute, arm {arm}")
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
        _batch_axis(ax, sorted({r["batch_size"] for r in rows if r.get("status") == "ran"}))
        ax.set_title(f"{loader}: {LOADER_NAMES.get(loader, loader)}", fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("seconds per epoch (log)")
    fig.suptitle(f"Claim A: time of one epoch, arm {ref} (timing passes extrapolated to an "
                 f"epoch)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss_first(path: Path, rows: list[dict], curves: dict, ref: str) -> None:
    """Per-iteration loss per batch size (shared y axis) and the oscillation figure per arm."""
    plt = _pyplot()
    pts = [r for r in arm_rows(rows, ref) if curves.get(ref, {}).get(str(r["batch_size"]))]
    n = len(pts) + 1
    ncols = n if n <= 3 else math.ceil(n / math.ceil(n / 3))  # 4 -> 2x2, 5/6 -> 2x3
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
    axes = grid.flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    values = sorted(x for r in pts for x in curves[ref][str(r["batch_size"])] if finite(x))
    top = values[min(len(values) - 1, int(0.999 * len(values)))] * 1.05 if values else 3.0
    for i, (ax, r) in enumerate(zip(axes, pts)):
        ys = curves[ref][str(r["batch_size"])]
        ax.plot(range(1, len(ys) + 1), ys, linewidth=0.5, color="tab:blue")
        ax.set_ylim(0, top)
        ax.set_title(f"bs {r['batch_size']}: osc {r['loss_osc_1000']:.3g}", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if i % ncols:
            ax.set_yticklabels([])
        else:
            ax.set_ylabel("training loss (batch mean)")
    ax = axes[n - 1]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        ok = [r for r in arm_rows(rows, arm) if finite(r.get("loss_osc_1000"))]
        if ok:
            ax.plot([r["batch_size"] for r in ok], [r["loss_osc_1000"] for r in ok], marker="o",
                    label=arm)
    ax.set_yscale("log")
    _log_ticks(ax.yaxis)
    _batch_axis(ax, sorted({r["batch_size"] for r in rows if r.get("status") == "ran"}))
    ax.set_title("mean |loss change| per iteration", fontsize=10)
    ax.legend(fontsize=8)
    fig.suptitle(f"Claim B: loss of the first iterations, arm {ref}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_to_target(path: Path, rows: list[dict], target: float) -> None:
    """Time and epochs to the target per batch size and arm; misses drawn as lower bounds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("time_to_target_s", "train_time_s", "training time to target (s, log)"),
              ("epochs_to_target", "epochs_run", "epochs to target (log)")]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for ax, (key, bound, label) in zip(axes, panels):
        for j, arm in enumerate(arms):
            color = f"C{j}"
            pts = arm_rows(rows, arm)
            hit = [r for r in pts if r.get("reached_target") and finite(r.get(key))]
            miss = [r for r in pts if not r.get("reached_target") and finite(r.get(bound))]
            ax.plot([r["batch_size"] for r in hit], [r[key] for r in hit], marker="o",
                    color=color, label=f"{arm}: reached")
            for r in miss:
                y = max(r[bound], 1e-3)
                if r.get("diverged"):
                    ax.scatter([r["batch_size"]], [y], marker="x", s=60, color=color)
                else:
                    ax.scatter([r["batch_size"]], [y], marker="^", s=60, facecolors="none",
                               edgecolors=color)
                ax.annotate("diverged" if r.get("diverged") else "not reached",
                            (r["batch_size"], y), textcoords="offset points",
                            xytext=(4, 6), fontsize=7, color=color)
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
        _batch_axis(ax, sorted({r["batch_size"] for r in rows if r.get("status") == "ran"}))
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Claim C: to {target:.0%} test accuracy (hollow ^ = not reached: time/epochs "
                 f"run, a lower bound; x = diverged)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(path: Path, rows: list[dict], evals: dict, target: float) -> None:
    """Test error (log) against training time, one panel per arm, one line per batch size.

    Error on a log axis shows 80% and 1.5% error alike, so the slow large batches and the
    approach to the target are both readable.
    """
    plt = _pyplot()
    arms = list(evals)
    fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(5.2 * max(1, len(arms)), 4),
                             sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for r in arm_rows(rows, arm):
            ev = [e for e in evals[arm].get(str(r["batch_size"]), []) if finite(e["val_acc"])]
            if ev:
                ax.plot([max(e["time_s"], 1e-2) for e in ev],
                        [max(1.0 - e["val_acc"], 1e-4) for e in ev], marker=".",
                        label=f"bs {r['batch_size']}")
        if target:
            ax.axhline(1.0 - target, color="gray", linestyle="--", linewidth=1,
                       label=f"target {target:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.xaxis)
        _log_ticks(ax.yaxis)
        ax.set_xlabel("training time (s, log; evaluation excluded)")
        ax.set_title(f"arm {arm}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test error = 1 - accuracy (log)")
    fig.suptitle("Test error against training time (each dot is one evaluation)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- study.md --------------------------------------------------------------------------------


def _timing_cell(r: dict, loader: str) -> str:
    e, d, c = (r.get(f"{loader}_{k}") for k in ("epoch_time_s", "data_time_s", "compute_time_s"))
    if not finite(e):
        return "—"
    return f"{e:.3g} = {d:.2g} + {c:.3g}"


def markdown_table(rows: list[dict], loaders: list[str]) -> str:
    """The results table of study.md (the CSV has every column)."""
    head = (["arm", "batch", "lr", "epochs run"]
            + [f"epoch s, {ld} (data + compute)" for ld in loaders]
            + ["loss osc", "target", "time to target s", "updates to target",
               "epochs to target", "final acc", "final lr", "outcome"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ran":
            blank = ["—"] * (len(head) - 3)
            cells = [r["arm"], str(r["batch_size"])] + blank + [r.get("note", "")]
        else:
            cells = ([r["arm"], str(r["batch_size"]), _fmt(r["lr"], "g"),
                      _fmt(r["epochs_run"], ".2f")]
                     + [_timing_cell(r, ld) for ld in loaders]
                     + [_fmt(r["loss_osc_1000"], ".3g"), _fmt(r["reached_target"]),
                        _fmt(r["time_to_target_s"], ".3g"), _fmt(r["steps_to_target"], "d"),
                        _fmt(r["epochs_to_target"], ".2f"), _fmt(r["final_val_acc"], ".4f"),
                        _fmt(r.get("final_lr"), ".3g"), r["outcome"]])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        f"- Loss oscillation (Claim B): mean |loss(t+1) - loss(t)| over the first "
        f"{sw['loss_iters']} iterations (or all there are), the batch-mean training loss"
        + (" of rank 0" if meta["world_size"] > 1 else "") + ".",
    ]
    if sw.get("quick"):
        lines.insert(0, f"- **Quick mode**: the first {sw['subset']} training samples, batch "
                        f"sizes {sw['batch_sizes']}, target {sw['target_acc']:.0%}: a smoke test "
                        "of the pipeline, not the study's answer.")
    return lines


def markdown(rows: list[dict], meta: dict, judged: list[Verdict], loaders: list[str]) -> str:
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
            f"{MANY_MORE_EPOCHS:g}x the fastest batch size's epochs to target."]
    notes = list(meta.get("notes", [])) + sorted({r["note"] for r in rows
                                                  if r.get("status") != "ran" and r.get("note")})
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, rows: list[dict], curves: dict, evals: dict,
                 meta: dict) -> dict[str, Path]:
    """Write study.csv/json, loss_curves.json, eval_curves.json, the PNGs and study.md."""
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
    write_csv(paths["csv"], rows, cols)
    write_json(paths["json"], {"meta": meta, "columns": cols,
                               "rows": [{c: r.get(c) for c in cols} for r in rows],
                               "verdicts": [{"claim": v.claim, "verdict": v.verdict,
                                             "parts": v.parts} for v in judged]})
    write_json(paths["loss_curves"], curves, indent=None)  # thousands of numbers: compact
    write_json(paths["eval_curves"], evals, indent=None)
    ref = reference_arm(rows)
    if ref is not None:
        plot_epoch_time(paths["epoch_time"], rows, ref, loaders)
        plot_loss_first(paths["loss_first"], rows, curves, ref)
    plot_time_to_target(paths["time_to_target"], rows, target)
    plot_accuracy(paths["accuracy"], rows, evals, target)
    paths["md"].write_text(markdown(rows, meta, judged, loaders))
    return paths
