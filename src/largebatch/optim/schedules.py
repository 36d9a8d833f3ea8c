"""LR schedule stepped once per optimizer step: linear warmup, then the main schedule.

(Minimal foundation version: warmup + constant. The full set of main schedules and the
plateau logic are filled in by the large-batch recipe work.)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from largebatch.config import ScheduleConfig
from largebatch.plan import BatchPlan


class LRSchedule:
    """Sets every param group's LR from the step count; one object, one ``state_dict``.

    Args:
        optimizer: the optimizer whose groups it drives.
        cfg: the schedule section.
        plan: the batch plan (peak LR and warmup steps come from it).
        total_steps: planned optimizer steps (for cosine/poly).
        reduce_mean: averages a float over ranks (identity for one process); applied to every
            metric before a plateau decision so all ranks decide the same at the same step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, plan: BatchPlan,
                 total_steps: int, reduce_mean: Optional[Callable[[float], float]] = None) -> None:
        self.optimizer = optimizer
        self.reduce_mean = reduce_mean or (lambda x: x)
        self.cfg = cfg
        self.peak_lr = plan.peak_lr
        self.warmup_steps = plan.warmup_steps
        self.total_steps = total_steps
        self.step_count = 0
        self.scale = 1.0  # multiplicative reductions applied by plateau decisions
        self._apply()

    def factor(self, step: int) -> float:
        """LR multiplier (of the peak) for the optimizer step that follows ``step`` steps."""
        if step < self.warmup_steps:
            start = self.cfg.warmup_start_factor
            return start + (1.0 - start) * step / self.warmup_steps
        return 1.0

    @property
    def lr(self) -> float:
        """The LR the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def _apply(self) -> None:
        lr = self.peak_lr * self.factor(self.step_count) * self.scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        """Advance one optimizer step."""
        self.step_count += 1
        self._apply()

    def on_eval(self, metric: float) -> Optional[str]:
        """Feed this rank's evaluation metric; returns the plateau action taken or None.

        The metric is averaged over ranks first (``reduce_mean``). Returns 'reduce_lr' when
        the LR was lowered, 'grow_batch' when the caller should grow the batch instead.
        """
        self.reduce_mean(metric)
        return None

    def reduce_lr(self) -> None:
        """Lower the LR by the plateau factor (fallback when the batch cannot grow)."""
        self.scale *= self.cfg.plateau.factor
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the schedule exactly."""
        return {"step_count": self.step_count, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict`` and re-apply the LR."""
        self.step_count = state["step_count"]
        self.scale = state["scale"]
        self._apply()


def build_schedule(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, plan: BatchPlan,
                   total_steps: int,
                   reduce_mean: Optional[Callable[[float], float]] = None) -> LRSchedule:
    """The configured schedule."""
    return LRSchedule(optimizer, cfg, plan, total_steps, reduce_mean)
