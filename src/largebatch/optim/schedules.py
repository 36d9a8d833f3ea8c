"""LR schedule stepped once per optimizer step: linear warmup, a main schedule, and plateau logic.

One ``LRSchedule`` object owns the whole LR of a run and one ``state_dict``:

* **Warmup** (Goyal et al. 2017, gradual warmup): for the first ``plan.warmup_steps`` optimizer
  steps the LR rises linearly from ``warmup_start_factor`` x peak to the peak
  (``plan.peak_lr``, already scaled by the batch-size rule). Step ``k < W`` uses
  ``peak * (s + (1 - s) * k / W)``, exactly torch's ``LinearLR(start_factor=s, total_iters=W)``.
* **Main schedule**, with ``t = step - W`` optimizer steps after warmup and
  ``T = total_steps - W`` decay steps:

  - ``constant``: the peak.
  - ``cosine``: ``min_lr + (peak - min_lr) * (1 + cos(pi * t / T)) / 2``, then ``min_lr`` for
    ``t >= T`` (torch's ``CosineAnnealingLR(T_max=T, eta_min=min_lr)`` until ``T``; torch's
    would rise again after it, this one stays at the floor).
  - ``step``: ``peak * gamma ** (number of milestones <= t)``: milestones are counted in
    optimizer steps **after warmup** (torch's ``MultiStepLR`` stepped once per optimizer step,
    started when warmup ends; a repeated milestone decays twice, like torch's).
  - ``poly``: ``min_lr + (peak - min_lr) * (1 - min(t, T) / T) ** power`` (torch's
    ``PolynomialLR(total_iters=T, power)`` when ``min_lr == 0``).
  - ``plateau``: the peak, lowered by ``ReduceLROnPlateau`` decisions (below).

* **Plateau** (only when ``name == 'plateau'``; ``on_eval`` is a no-op otherwise): torch's
  ``ReduceLROnPlateau`` bookkeeping (mode, threshold, threshold_mode, patience, cooldown) fed
  one metric per evaluation, averaged over ranks first so every rank decides the same. On a
  plateau, action ``reduce_lr`` lowers the LR to ``max(lr * factor, min_lr)`` unless that changes
  it by ``eps`` or less (torch's rule); action ``grow_batch`` returns ``'grow_batch'`` and the
  trainer grows the batch instead (falling back to ``reduce_lr()`` at ``max_global_size``,
  Smith et al. 2018). **Evaluations before warmup has finished are ignored** (not averaged, not
  counted): the LR is still rising, so a flat metric there says nothing about a plateau.

Plateau reductions are a multiplicative ``scale`` on top of warmup x main schedule, so they
compose with any main schedule (e.g. the ``reduce_lr()`` fallback).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch

# Validation of the section lives in config (one place); LRSchedule re-runs it for sections
# built in code.
from largebatch.config import ConfigError, PlateauConfig, ScheduleConfig, check_schedule
from largebatch.plan import BatchPlan


class PlateauTracker:
    """torch's ``ReduceLROnPlateau`` bookkeeping, without touching any LR.

    ``update(metric)`` returns True exactly when torch's scheduler would call ``_reduce_lr``
    for the same metric sequence; the caller decides what a plateau does.
    """

    def __init__(self, cfg: PlateauConfig) -> None:
        self.cfg = cfg
        self.best = self._worst()
        self.num_bad = 0
        self.cooldown_counter = 0
        self.num_evals = 0

    def _worst(self) -> float:
        return math.inf if self.cfg.mode == "min" else -math.inf

    def is_better(self, a: float, best: float) -> bool:
        """torch's comparison: relative or absolute threshold, in the mode's direction."""
        c = self.cfg
        if c.mode == "min":
            return a < (best * (1.0 - c.threshold) if c.threshold_mode == "rel"
                        else best - c.threshold)
        return a > (best * (1.0 + c.threshold) if c.threshold_mode == "rel"
                    else best + c.threshold)

    def update(self, metric: float) -> bool:
        """Count one evaluation; True when it completes a plateau (patience exhausted)."""
        self.num_evals += 1
        if self.is_better(metric, self.best):
            self.best, self.num_bad = metric, 0
        else:
            self.num_bad += 1  # NaN is never better: it counts as a bad evaluation, like torch
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0  # bad evaluations during cooldown do not count
        if self.num_bad > self.cfg.patience:
            self.cooldown_counter, self.num_bad = self.cfg.cooldown, 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The counters (best may be +-inf: stored as a float)."""
        return {"best": self.best, "num_bad": self.num_bad,
                "cooldown_counter": self.cooldown_counter, "num_evals": self.num_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self.num_evals = int(state.get("num_evals", 0))


class LRSchedule:
    """Sets every param group's LR from the step count; one object, one ``state_dict``.

    Args:
        optimizer: the optimizer whose groups it drives, or a list of them (all set alike).
        cfg: the schedule section.
        plan: the batch plan (peak LR and warmup steps come from it).
        total_steps: planned optimizer steps including warmup (for cosine/poly).
        reduce_mean: averages a float over ranks (identity for one process); applied to every
            metric before a plateau decision so all ranks decide the same at the same step.
            It is a collective: every rank calls ``on_eval`` at the same optimizer step, and
            whether it is called depends only on state that is identical on all ranks.

    Raises:
        ConfigError: a schedule value is out of range.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
                 cfg: ScheduleConfig, plan: BatchPlan,
                 total_steps: int, reduce_mean: Optional[Callable[[float], float]] = None) -> None:
        check_schedule(cfg)
        # Several optimizers (the backbone's and a sharded head's) follow one LR; the first
        # is the one ``lr`` reports.
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) \
            else [optimizer]
        self.optimizer = self.optimizers[0]
        self.reduce_mean = reduce_mean or (lambda x: x)
        self.cfg = cfg
        self.peak_lr = plan.peak_lr
        self.warmup_steps = plan.warmup_steps
        self.total_steps = total_steps
        self.step_count = 0
        self.scale = 1.0  # multiplicative reductions applied by plateau decisions
        self.plateau = PlateauTracker(cfg.plateau)
        self._apply()

    # ---- the LR as a function of the step -----------------------------------------------------
    def base_lr(self, step: int) -> float:
        """Warmup x main schedule LR (before plateau reductions) after ``step`` optimizer steps."""
        w = self.warmup_steps
        if step < w:
            start = self.cfg.warmup_start_factor
            return self.peak_lr * (start + (1.0 - start) * step / w)
        return self._main_lr(step - w)

    def _main_lr(self, t: int) -> float:
        """The main schedule ``t`` optimizer steps after warmup."""
        c, peak = self.cfg, self.peak_lr
        if c.name in ("constant", "plateau"):
            return peak
        if c.name == "step":
            return peak * c.gamma ** bisect.bisect_right(sorted(c.milestones), t)
        decay = self.total_steps - self.warmup_steps
        progress = min(t, decay) / decay if decay > 0 else 1.0  # no decay window: at the floor
        if c.name == "cosine":
            return c.min_lr + (peak - c.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2.0
        return c.min_lr + (peak - c.min_lr) * (1.0 - progress) ** c.power  # poly

    def factor(self, step: int) -> float:
        """LR multiplier (of the peak) for the optimizer step that follows ``step`` steps."""
        return self.base_lr(step) / self.peak_lr

    @property
    def lr(self) -> float:
        """The LR the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        lr = self.base_lr(self.step_count) * self.scale
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        """Advance one optimizer step (call once per optimizer step, never per micro-batch)."""
        self.step_count += 1
        self._apply()

    def set_peak_lr(self, peak_lr: float) -> None:
        """Move the peak (``batch.adapt=goodput`` changed the batch; the plan's rule gives the
        new peak): warmup and the main schedule follow it from this step on, plateau
        reductions (``scale``) stay."""
        self.peak_lr = float(peak_lr)
        self._apply()

    def retarget(self, peak_lr: float, warmup_steps: int, warmup_start_factor: float) -> None:
        """A new peak LR and warmup (``optim.lr=auto``: the range test found them); the LR of
        the current step is applied at once. The config section stays what the user wrote
        (a copy of it carries the new start factor)."""
        self.peak_lr, self.warmup_steps = float(peak_lr), int(warmup_steps)
        self.cfg = dataclasses.replace(self.cfg, warmup_start_factor=float(warmup_start_factor))
        self._apply()

    def set_length(self, total_steps: int) -> None:
        """A new length of the decay (``total_steps`` optimizer steps incl. warmup: cosine and
        poly reach their floor there), from this step on; the LR of the current step is
        applied at once (a run that trains longer or shorter than its checkpoint's)."""
        self.total_steps = int(total_steps)
        self._apply()

    def hold(self, lr: float) -> None:
        """Set every group's LR to ``lr`` now, outside the schedule (the LR range test's ramp);
        the schedule's own LR comes back at the next ``step`` or ``load_state_dict``."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    # ---- plateau ------------------------------------------------------------------------------
    @property
    def plateau_active(self) -> bool:
        """Whether an evaluation can lead to a decision now (same answer on every rank)."""
        return self.cfg.name == "plateau" and self.step_count >= self.warmup_steps

    def on_eval(self, metric: float) -> Optional[str]:
        """Feed this rank's evaluation metric; returns the plateau action taken or None.

        The metric is averaged over ranks first (``reduce_mean``). Returns 'reduce_lr' when
        the LR was lowered, 'grow_batch' when the caller should grow the batch instead, None
        otherwise (no plateau, a plateau at ``min_lr``, during warmup, or another schedule).
        """
        if not self.plateau_active:
            return None  # skipped identically on all ranks, so the collective stays matched
        mean = float(self.reduce_mean(float(metric)))
        if not self.plateau.update(mean):
            return None
        if self.cfg.plateau.action == "grow_batch":
            return "grow_batch"
        return "reduce_lr" if self.reduce_lr() else None

    def reduce_lr(self) -> bool:
        """Lower the LR by the plateau factor, floored at ``plateau.min_lr``.

        Like torch, a change of ``plateau.eps`` or less is not applied. Returns whether the LR
        changed. Also the fallback when the batch cannot grow any more.
        """
        p = self.cfg.plateau
        old = self.base_lr(self.step_count) * self.scale
        new = max(old * p.factor, p.min_lr)
        if not old - new > p.eps:
            return False
        # Unclamped: multiply by the factor itself (no rounding from new / old).
        self.scale = self.scale * p.factor if new == old * p.factor else self.scale * new / old
        self._apply()
        return True

    # ---- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly."""
        return {"step_count": self.step_count, "scale": self.scale,
                "plateau": self.plateau.state_dict(), "peak_lr": self.peak_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` and re-apply the LR."""
        self.step_count = int(state["step_count"])
        self.scale = float(state["scale"])
        if "peak_lr" in state:  # absent before batch.adapt: the plan's peak, unchanged
            self.peak_lr = float(state["peak_lr"])
        if "plateau" in state:  # absent in checkpoints of the warmup+constant foundation
            self.plateau.load_state_dict(state["plateau"])
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer], cfg: ScheduleConfig, plan: BatchPlan,
                   total_steps: int,
                   reduce_mean: Optional[Callable[[float], float]] = None) -> LRSchedule:
    """The configured schedule.

    Raises:
        ConfigError: a schedule value is out of range, or an explicit ``schedule.total_steps``
            leaves no decay window after warmup for cosine/poly.
    """
    if cfg.name in ("cosine", "poly") and cfg.total_steps and cfg.total_steps <= plan.warmup_steps:
        raise ConfigError(f"schedule.total_steps={cfg.total_steps} must exceed the warmup of "
                          f"{plan.warmup_steps} optimizer steps for schedule.name={cfg.name}")
    return LRSchedule(optimizer, cfg, plan, total_steps, reduce_mean)
