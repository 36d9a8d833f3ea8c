"""``schedule.name: plateau``: what a plateau of the evaluation metric does to a run.

The plateau decision itself (torch's ``ReduceLROnPlateau`` bookkeeping) belongs to the schedule,
which owns the LR (``largebatch.optim.schedules``): fed each evaluation's metric, it lowers the
LR on a plateau (``action: reduce_lr``) or says ``grow_batch``. Then this policy grows the
global batch through accumulation instead (Smith et al. 2018, "Don't decay the learning rate,
increase the batch size"), and at ``batch.max_global_size`` asks for the LR cut after all.
"""
from __future__ import annotations

from typing import Optional, Sequence

from largebatch.config import Config, ConfigError
from largebatch.optim.schedules import LRSchedule
from largebatch.policies.base import BatchPolicy, PlanChange, PolicyView
from largebatch.tasks.base import Metric, Task


def plateau_metric(cfg: Config, task: Task) -> Optional[Metric]:
    """The metric plateau decisions follow (None without a plateau schedule); its mode must
    match ``schedule.plateau.mode``, else the LR would drop while it improves.

    Raises:
        ConfigError: an unknown metric, or a mode that contradicts the metric's.
    """
    p = cfg.schedule.plateau
    if cfg.schedule.name != "plateau":
        return None
    metric = task.metric(p.metric, "schedule.plateau.metric")
    if metric.mode != p.mode:
        raise ConfigError(f"schedule.plateau.mode={p.mode} but {metric.name} is better when "
                          f"{'larger' if metric.mode == 'max' else 'smaller'} "
                          f"(use schedule.plateau.mode={metric.mode})")
    return metric


class PlateauPolicy(BatchPolicy):
    """Feeds every evaluation to the schedule's plateau tracker; grows the batch on its word.

    Args:
        schedule: the run's LR schedule (its ``on_eval`` is a collective: every rank calls it).
        metric: the metric it follows (``plateau_metric``).
        factor: ``schedule.plateau.factor`` (the batch grows by about its inverse).
    """

    name = "plateau"

    def __init__(self, schedule: LRSchedule, metric: Metric, factor: float) -> None:
        self.schedule, self.metric, self.factor = schedule, metric, factor

    def after_eval(self, view: PolicyView) -> Sequence[PlanChange]:
        """A plateau with ``action: grow_batch``: the grown plan, or at the cap an LR cut."""
        if self.schedule.on_eval(view.metrics[self.metric.name]) != "grow_batch":
            return ()
        grown = view.plan.grown(self.factor)
        if grown is None:  # at batch.max_global_size: lower the LR after all
            return (PlanChange("reduce_lr", reduce_lr=True),)
        return (PlanChange("grow_batch", plan=grown),)


def build_plateau(cfg: Config, task: Task, schedule: LRSchedule) -> list[BatchPolicy]:
    """``[PlateauPolicy]`` for a plateau schedule, else ``[]``.

    Raises:
        ConfigError: see ``plateau_metric``.
    """
    metric = plateau_metric(cfg, task)
    if metric is None:
        return []
    return [PlateauPolicy(schedule, metric, cfg.schedule.plateau.factor)]
