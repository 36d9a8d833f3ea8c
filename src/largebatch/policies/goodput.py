"""``batch.adapt: goodput`` as a batch policy: the goodput model (``goodput_model``) asked at
the run's moments, its choices returned as plan changes.

After every applied step inside an epoch (and at every epoch start) the policy applies a
pending micro size whose position has come, and decides when a decision is due (always at an
epoch start): every rank at the same step, one small collective per decision. Each judged
decision is logged as an ``adapt_decision`` record, whether the batch changes or not: the
noise scale, the throughput model (c, gamma), the best candidate and its predicted gain over
the current batch. The model learns from every applied step's time and noise-scale estimates.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from largebatch.config import Config, ConfigError
from largebatch.plan import BatchPlan
from largebatch.policies.base import BatchPolicy, PlanChange, PolicyView
from largebatch.policies.goodput_model import (  # noqa: F401 (re-exported for callers)
    GoodputAdapter, efficiency, fit_line, micro_sizes, time_forward_backward)
from largebatch.tune.exact_state import preserved


class GoodputPolicy(BatchPolicy):
    """The goodput-maximising batch, re-chosen every ``batch.adapt_every_steps`` steps.

    Args:
        adapter: the goodput model (holds the profile, the step times, the pending size).
        engine: the run's engine (the profile times its unwrapped model, restores its state).
        loss: the task's micro-batch loss ``loss(model, x, y)``.
    """

    name = "goodput"
    needs_noise_scale = True

    def __init__(self, adapter: GoodputAdapter, engine: Any,
                 loss: Callable[..., Any]) -> None:
        self.adapter, self.engine, self.loss = adapter, engine, loss

    def _profile(self, view: PolicyView) -> Callable[[list[int]], list[float]]:
        """``profile(sizes)`` on the unwrapped model and the last micro-batch, with weights,
        gradients, optimizer state, train mode and RNG restored afterwards."""
        def profile(sizes: list[int]) -> list[float]:
            x, y = view.sample
            model = self.engine.unwrapped()
            with preserved(model, self.engine.optimizer):
                model.train()
                return time_forward_backward(model, self.loss, x, y, sizes,
                                             self.engine.autocast)
        return profile

    def at_epoch_start(self, view: PolicyView) -> Sequence[PlanChange]:
        """A pending micro size (position 0 allows any), then a decision (always due)."""
        return self._adapt(view)

    def after_step(self, view: PolicyView) -> Sequence[PlanChange]:
        """Learn from the step; then a pending micro size and a due decision."""
        self.adapter.observe(view.plan.micro_size, view.micro_batches, view.step_seconds,
                             view.noise_raw)
        return () if view.epoch_end else self._adapt(view)

    def _adapt(self, view: PolicyView) -> list[PlanChange]:
        adapter, plan, changes = self.adapter, view.plan, []
        adapter.last_judgement = None
        ready = adapter.pending_at(plan, view.position)
        if ready is not None:  # the same global batch, in the micro-batches chosen for it
            adapter.pending = None
            before, plan = plan, plan.resized(*ready)
            changes.append(_change(before, plan, view.step, {"reason": "pending_micro"}))
        if not (view.epoch_start or adapter.due(view.step)):
            return changes
        choice = adapter.decide(plan, view.step, view.position, view.reduce_mean,
                                self._profile(view))
        if adapter.last_judgement is not None:  # why the batch stays or changes, every time
            view.log({"kind": "adapt_decision", "samples": view.samples,
                      "global_size": plan.global_size, "micro_size": plan.micro_size,
                      "accum_steps": plan.accum_steps, **adapter.last_judgement})
        if choice is not None:
            new = plan.resized(choice["micro_size"], choice["accum_steps"])
            changes.append(_change(plan, new, view.step, {
                "reason": "decision", "noise_scale": choice["noise_scale"],
                "predicted_gain": choice["gain"]}))
        return changes

    def max_window(self, plan: BatchPlan, position: int) -> Optional[int]:
        """A window that ends where the pending micro size divides the position."""
        return self.adapter.max_window(plan, position)

    def state_dict(self) -> dict[str, Any]:
        return self.adapter.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapter.load_state_dict(state)

    def load_resharded(self, state: dict[str, Any], old_world: int) -> None:
        """A pending micro size was chosen for the old world's ranks: dropped."""
        self.adapter.load_state_dict(state, resharded=True)


def _change(before: BatchPlan, new: BatchPlan, step: int, why: dict[str, Any]) -> PlanChange:
    """An ``adapt`` plan change from ``before`` to ``new`` with the line rank 0 prints."""
    extra = (f", noise scale {why['noise_scale']:.1f}, predicted goodput "
             f"x{why['predicted_gain']:.2f}" if "noise_scale" in why else
             " (the micro size chosen before)")
    line = (f"batch.adapt: step {step}: global batch {before.global_size} -> "
            f"{new.global_size} (micro {new.micro_size} x accum {new.accum_steps} x world "
            f"{new.world_size}), peak LR {new.peak_lr:.4g}{extra}")
    return PlanChange("adapt", plan=new, record=why, announce=line)


def build_goodput(cfg: Config, plan: BatchPlan, can_change_micro: bool, engine: Any,
                  loss: Callable[..., Any]) -> list[BatchPolicy]:
    """``[GoodputPolicy]`` for ``batch.adapt=goodput``, else ``[]``.

    Raises:
        ConfigError: goodput on one process without accumulation (no small batches).
    """
    b = cfg.batch
    if b.adapt != "goodput":
        return []
    if plan.world_size == 1 and plan.accum_steps < 2:
        raise ConfigError(f"batch.adapt=goodput on one process needs batch.accum_steps >= 2 "
                          f"(the noise scale's small batches are the window's micro-batches); "
                          f"got micro {plan.micro_size} x accum {plan.accum_steps}, e.g. "
                          f"batch.micro_size={max(1, plan.global_size // 2)}")
    adapter = GoodputAdapter(plan, b.adapt_every_steps, b.adapt_max_micro, can_change_micro)
    return [GoodputPolicy(adapter, engine, loss)]
