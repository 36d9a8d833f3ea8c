"""What a plateau does to a run: the metric it follows, and batch growth (Smith et al. 2018).

The plateau decision itself (torch's ``ReduceLROnPlateau`` bookkeeping) is the schedule's
(``largebatch.optim.schedules``); this module holds the trainer's side of it.
"""
from __future__ import annotations

from typing import Any, Optional

from largebatch.config import Config, ConfigError
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


def grow_batch(trainer: Any) -> None:
    """Smith et al. 2018: grow the trainer's batch through accumulation; at
    ``batch.max_global_size`` lower the LR instead. Records the change (``plan_change``)."""
    s = trainer.state
    grown = trainer.plan.grown(trainer.cfg.schedule.plateau.factor)
    change = {"kind": "plan_change", "step": s.step, "samples": s.samples}
    if grown is None:
        trainer.schedule.reduce_lr()
        change.update(action="reduce_lr", lr=trainer.schedule.lr)
    else:
        trainer.plan = grown
        change.update(action="grow_batch", global_size=grown.global_size,
                      accum_steps=grown.accum_steps)
    s.plan_changes.append(change)
    trainer.logger.log(change)
