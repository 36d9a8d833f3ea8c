"""The study's PNG figures (matplotlib, Agg backend: files only, never a window)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from largebatch.study._util import finite
from largebatch.study.verdicts import arm_rows

LOADER_NAMES = {"torch": "torch DataLoader + ToTensor + Normalize",
                "memory": "in-memory tensor, sliced by index"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, never a window (servers, CI, torchrun ranks)
    import matplotlib.pyplot as plt
    return plt


def _save(fig: Any, path: Path) -> None:
    """Lay out, write the PNG and free the figure (every plot ends the same way)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


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
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


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
    _save(fig, path)


def plot_noise_scale(path: Path, rows: list[dict], noise: dict) -> None:
    """B_simple against samples seen, one panel per arm, one line per batch size.

    Each batch size is also drawn as a dotted horizontal line in its line's colour: where a
    run's B_simple lies above its own batch size, that batch is below the noise scale (it
    scales almost perfectly); below it, the batch wastes samples.
    """
    plt = _pyplot()
    arms = list(noise)
    fig, axes = plt.subplots(1, max(1, len(arms)), figsize=(5.6 * max(1, len(arms)), 4.3),
                             sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({r["batch_size"] for r in rows if r.get("status") == "ran"})
    for ax, arm in zip(axes[0], arms):
        for i, b in enumerate(sizes):
            color = colors[i % len(colors)]
            pts = [p for p in noise[arm].get(str(b), []) if finite(p["noise_scale"])
                   and p["noise_scale"] > 0 and p["samples"] > 0]
            if pts:
                ax.plot([p["samples"] for p in pts], [p["noise_scale"] for p in pts],
                        color=color, linewidth=1.2, label=f"B_simple, run at bs {b}")
            ax.axhline(b, color=color, linestyle=":", linewidth=1,
                       label=f"batch size {b}" + ("" if pts else " (n/a)"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax.yaxis)
        ax.set_xlabel("training samples seen (log)")
        ax.set_title(f"arm {arm}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("B_simple = tr(Σ) / |G|² (log)")
    fig.suptitle("Gradient noise scale across training (dotted: the batch sizes of the sweep)",
                 fontsize=11)
    _save(fig, path)
