"""The LR range test (Smith 2015/2017; fastai's and Lightning's ``lr_find``) at the planned batch.

The test drives the run's own ``Trainer.train_step``, so every step is one optimizer step over
the planned global batch through the real engine (accumulation, DDP, DeepSpeed), and its loss
is the global batch's loss the trainer already agrees on across ranks: every rank sees the same
curve, stops at the same step and computes the same suggestions.

Procedure:

* Step ``k`` (``k = 0 .. steps-1``) sets the LR ``min_lr * (max_lr / min_lr) ** (k / (steps-1))``
  on every optimizer of the engine (the schedule is bypassed) and runs one optimizer step. Its
  loss is the one the step's forward pass computed, i.e. before the update with that LR (the
  pairing fastai and Lightning use).
* The curve is smoothed with a bias-corrected EMA (``beta = 0.98``, fastai's):
  ``avg = beta * avg + (1 - beta) * loss``, ``smoothed = avg / (1 - beta ** (k + 1))``.
* The test stops early when the smoothed loss exceeds ``stop_factor`` (4) x its best, or a loss
  is non-finite (the trainer then dropped that update).
* Only full windows of the plan are used (an epoch's short last window is skipped, and the
  next epoch's permutation follows), so every step sees exactly the planned global batch.

Suggestions (``suggest``), all read off the smoothed curve of the finite steps:

* ``steepest``: the LR of the most negative ``d smoothed / d log(lr)`` (``numpy.gradient``),
  skipping the first ``max(1, n // 10)`` points (the EMA's start is noisy) and the last one.
* ``lr_at_min``: the LR of the smoothed minimum. It sits at the edge of divergence: the
  smoothed loss lags the raw one by several ramp steps and a slowly diverging stiff direction
  hides below the others for a while (on a quadratic the minimum lies above ``2 / lambda_max``).
* ``max_stable``: ``lr_at_min / 10``, fastai's "minimum / 10" margin below that edge: the
  largest LR this rule calls stable.
* ``lr`` (the suggested peak LR): ``min(steepest, max_stable)``, the LR both rules call safe.
* ``onset``: where the loss starts decreasing: the smallest LR from which the smoothed loss
  stays, up to its minimum, 10% of its total drop below its highest value before the minimum
  (the first ``max(1, n // 10)`` points left out, as for ``steepest``).
* Warmup: the test itself went from ``onset`` to ``lr`` in ``warmup_steps`` ramp steps
  (``ceil(log(lr / onset) / log(ramp factor per step))``) at this batch without diverging, so
  that warmup, linear from ``warmup_start_factor = onset / lr`` (floored at 0.01), is suggested;
  0 steps (factor 1) when the suggestion is not above the onset. It grows with the distance
  from the onset in decades and with the ramp's resolution (``steps`` per decade).

The run is restored afterwards exactly (``snapshot`` / ``restore``): model, optimizer and
grad-scaler state (the engine's own ``state_dict``, DeepSpeed's partitions included), the LR
schedule, the run counters, the noise-scale EMAs, the Python/NumPy/torch RNGs and the loader's
epoch, so a training after the test starts from the original initialisation and sees the data
it would have seen (``optim.lr: auto``, ``largebatch.tune.lr_auto``, relies on it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from largebatch.config import ConfigError
from largebatch.io import write_json_atomic

#: fastai's smoothing and stop rule.
BETA = 0.98
STOP_FACTOR = 4.0
#: ``max_stable = lr_at_min / MIN_DIVISOR`` (fastai's "minimum / 10").
MIN_DIVISOR = 10.0
#: The onset is where the smoothed loss has made this share of its total drop.
ONSET_FRACTION = 0.1
#: The smallest warmup start factor suggested.
MIN_START_FACTOR = 0.01


@dataclass
class LRFindResult:
    """One range test: the LRs tried, raw and smoothed losses, why it stopped, suggestions."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stop_reason: str  # 'max_lr' (ramp done), 'diverged' (4x best), 'nonfinite'
    suggestions: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers as strings, as metrics.jsonl writes them)."""
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return str(v)
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        return clean(asdict(self))


def check_args(min_lr: float, max_lr: float, steps: int) -> None:
    """Refuse a ramp that cannot be run.

    Raises:
        ConfigError: ``min_lr <= 0``, ``min_lr >= max_lr`` or ``steps < 5``.
    """
    if not (min_lr > 0 and math.isfinite(min_lr)):
        raise ConfigError(f"lr-find: --min-lr={min_lr} must be a positive number")
    if not (max_lr > min_lr and math.isfinite(max_lr)):
        raise ConfigError(f"lr-find: --max-lr={max_lr} must be larger than --min-lr={min_lr}")
    if steps < 5:
        raise ConfigError(f"lr-find: --steps={steps} is too few for a range test (need >= 5)")


def ramp(min_lr: float, max_lr: float, steps: int) -> list[float]:
    """The exponential ramp: ``steps`` LRs from ``min_lr`` to ``max_lr`` inclusive."""
    return [min_lr * (max_lr / min_lr) ** (k / (steps - 1)) for k in range(steps)]


def smooth(losses: list[float], beta: float = BETA) -> list[float]:
    """fastai's bias-corrected exponential moving average of ``losses``."""
    avg, out = 0.0, []
    for k, loss in enumerate(losses):
        avg = beta * avg + (1.0 - beta) * loss
        out.append(avg / (1.0 - beta ** (k + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], steps_per_epoch: float = 0.0
            ) -> dict[str, Any]:
    """The suggestions of the module docstring from a (finite) smoothed curve.

    Args:
        lrs: the LRs of the ramp's steps, in order (exponentially spaced).
        smoothed: the smoothed loss of each of those steps (only finite values).
        steps_per_epoch: the plan's optimizer steps per epoch (for ``warmup_epochs``; 0: none).

    Returns:
        ``steepest``, ``lr_at_min``, ``max_stable``, ``lr``, ``onset``, ``warmup_steps``,
        ``warmup_start_factor``, ``warmup_epochs`` and ``note``; the LRs are None when fewer
        than 5 finite points exist.
    """
    n = len(smoothed)
    out: dict[str, Any] = dict.fromkeys(("steepest", "lr_at_min", "max_stable", "lr", "onset",
                                         "warmup_steps", "warmup_start_factor",
                                         "warmup_epochs"))
    if n < 5:
        out["note"] = f"only {n} finite steps: lower --min-lr or --max-lr"
        return out
    s, log_lr = np.asarray(smoothed, dtype=np.float64), np.log(np.asarray(lrs[:n]))
    grad = np.gradient(s, log_lr)
    start = max(1, n // 10)
    steep = start + int(np.argmin(grad[start:n - 1]))
    i_min = int(np.argmin(s))
    out.update(steepest=float(lrs[steep]), lr_at_min=float(lrs[i_min]),
               max_stable=float(lrs[i_min] / MIN_DIVISOR))
    out["lr"] = min(out["steepest"], out["max_stable"])
    out["note"] = ("the loss never rose: the minimum is the ramp's end, raise --max-lr"
                   if i_min == n - 1 else "")
    ref = float(np.max(s[start:i_min + 1])) if i_min >= start else float(s[0])
    drop = ref - s[i_min]
    if drop <= 0:
        out["note"] = "the loss never decreased: raise --max-lr or train longer per step"
        return out
    # The first LR from which the curve stays below the threshold up to the minimum: a noisy
    # start that dips below it for a step or two is not where the loss starts decreasing.
    above = np.nonzero(s[:i_min + 1] > ref - ONSET_FRACTION * drop)[0]
    onset = int(above[-1]) + 1 if len(above) else 0
    out["onset"] = float(lrs[onset])
    per_step = math.log(lrs[1] / lrs[0])
    if out["lr"] <= out["onset"]:
        out.update(warmup_steps=0, warmup_start_factor=1.0)
    else:
        out["warmup_steps"] = int(math.ceil(math.log(out["lr"] / out["onset"]) / per_step - 1e-9))
        out["warmup_start_factor"] = max(MIN_START_FACTOR, out["onset"] / out["lr"])
    if steps_per_epoch:
        out["warmup_epochs"] = out["warmup_steps"] / steps_per_epoch
    return out


# ---- the test ------------------------------------------------------------------------------
def _ramp_losses(trainer: Any, lrs: list[float], beta: float, stop_factor: float
                 ) -> tuple[list[float], list[float], str]:
    """Run the ramp; returns raw losses, smoothed losses and why it stopped."""
    losses: list[float] = []
    avg, best, reason = 0.0, math.inf, "max_lr"
    windows = trainer.full_windows()
    trainer.model.train()
    for k, lr in enumerate(lrs):
        try:
            batches, n_micro, window = next(windows)
        except StopIteration:
            plan = trainer.plan
            raise ConfigError(f"lr-find: an epoch of {plan.shard_size} samples per rank holds "
                              f"no full window of {plan.window_size} (batch.global_size="
                              f"{plan.global_size}); use more data or a smaller batch") from None
        trainer.schedule.hold(lr)
        loss, _, applied = trainer.train_step(batches, n_micro, window)
        losses.append(loss)
        if not applied or not math.isfinite(loss):
            reason = "nonfinite"
            break
        avg = beta * avg + (1.0 - beta) * loss
        value = avg / (1.0 - beta ** (k + 1))
        best = min(best, value)
        if value > stop_factor * best:
            reason = "diverged"
            break
    finite = [x for x in losses if math.isfinite(x)]
    return losses, smooth(finite, beta), reason


def lr_find(trainer: Any, min_lr: float = 1e-6, max_lr: float = 10.0, steps: int = 100,
            beta: float = BETA, stop_factor: float = STOP_FACTOR) -> LRFindResult:
    """Run the LR range test on a built ``Trainer`` and restore it exactly afterwards.

    Every rank must call it (each step is the trainer's, with its collectives).

    Args:
        trainer: the run's trainer (``largebatch.train.build.build_run(cfg).trainer``), before or
            between trainings.
        min_lr: the first LR of the ramp.
        max_lr: the last LR of the ramp.
        steps: optimizer steps of the ramp (at most; it stops early on divergence).
        beta: the smoothing EMA's coefficient.
        stop_factor: stop when the smoothed loss exceeds this times its best.

    Returns:
        The curve and the suggestions (the same on every rank).

    Raises:
        ConfigError: a bad ramp (``check_args``) or a dataset without one full global batch.
    """
    check_args(min_lr, max_lr, steps)
    lrs = ramp(min_lr, max_lr, steps)
    snap = trainer.snapshot()
    try:
        losses, smoothed, reason = _ramp_losses(trainer, lrs, beta, stop_factor)
    finally:
        trainer.restore(snap)
    plan = trainer.plan
    result = LRFindResult(lrs=lrs[:len(losses)], losses=losses, smoothed=smoothed,
                          stop_reason=reason, plan=plan.to_json(),
                          settings={"min_lr": min_lr, "max_lr": max_lr, "steps": steps,
                                    "beta": beta, "stop_factor": stop_factor})
    result.suggestions = suggest(lrs[:len(smoothed)], smoothed, plan.steps_per_epoch)
    return result


# ---- outputs -------------------------------------------------------------------------------
def write_outputs(result: LRFindResult, out_dir: Path | str) -> tuple[Path, Path]:
    """Write ``lr_find.json`` and ``lr_find.png`` (log-x, raw and smoothed loss) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "lr_find.json", out / "lr_find.png"
    write_json_atomic(json_path, result.to_json())
    _plot(result, png_path)
    return json_path, png_path


def _plot(result: LRFindResult, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(result.smoothed)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [(lr, x) for lr, x in zip(result.lrs, result.losses) if math.isfinite(x)]
    ax.plot([p[0] for p in finite], [p[1] for p in finite], color="0.7", lw=1, label="loss")
    ax.plot(result.lrs[:n], result.smoothed, color="C0", lw=2, label=f"smoothed (beta {BETA})")
    s = result.suggestions
    for key, color in (("steepest", "C2"), ("max_stable", "C3"), ("onset", "C1")):
        if s.get(key):
            ax.axvline(s[key], color=color, ls="--", lw=1, label=f"{key} {s[key]:.3g}")
    if s.get("lr"):
        ax.axvline(s["lr"], color="k", lw=1.5, label=f"suggested {s['lr']:.3g}")
    if result.smoothed:  # the explosion past the stop is left out of view
        lo = min(min(result.smoothed), min(p[1] for p in finite))
        hi = max(result.smoothed[0], min(result.smoothed) * 2)
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (global batch)")
    g = result.plan.get("global_size")
    ax.set_title(f"LR range test, global batch {g}, stop: {result.stop_reason}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_summary(result: LRFindResult) -> str:
    """A few human lines: the ramp, how it ended, the suggestions."""
    s, lrs = result.suggestions, result.lrs
    lines = [f"lr-find: {len(lrs)} steps at global batch {result.plan.get('global_size')}, "
             f"lr {lrs[0]:.3g} -> {lrs[-1]:.3g}, stopped: {result.stop_reason}"]
    if s.get("lr") is None:
        return "\n".join(lines + [f"lr-find: no suggestion ({s.get('note')})"])
    fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines.append(f"lr-find: steepest {fmt(s['steepest'])}, max stable {fmt(s['max_stable'])} "
                 f"(minimum at {fmt(s['lr_at_min'])} / {MIN_DIVISOR:g}), onset {fmt(s['onset'])}")
    lines.append(f"lr-find: suggested peak lr {fmt(s['lr'])}, warmup {s['warmup_steps']} steps "
                 f"from factor {fmt(s['warmup_start_factor'])}")
    if s.get("note"):
        lines.append(f"lr-find: note: {s['note']}")
    return "\n".join(lines)


def train_overrides(result: LRFindResult, base_lr: float, plan_peak_lr: float
                    ) -> Optional[list[str]]:
    """``key=value`` overrides that make a training use the suggestion as its peak LR.

    ``optim.lr`` is the base LR the plan scales (``optim.scale_rule``): the suggestion is divided
    by the config's scale factor ``plan_peak_lr / base_lr`` so the plan's peak equals it.
    """
    s = result.suggestions
    if s.get("lr") is None:
        return None
    factor = plan_peak_lr / base_lr if base_lr > 0 else 1.0
    out = [f"optim.lr={s['lr'] / factor:.4g}"]
    if s.get("warmup_steps") is not None:
        out += ["schedule.warmup_epochs=0", f"schedule.warmup_steps={s['warmup_steps']}"]
        if s["warmup_steps"]:
            out.append(f"schedule.warmup_start_factor={s['warmup_start_factor']:.3g}")
    return out
