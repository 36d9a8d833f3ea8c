"""The run's counters and timers: what a checkpoint captures to resume exactly."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from largebatch.plan import BatchPlan, resolve_batch


@dataclass
class RunState:
    """Counters of the run (what a checkpoint must capture to resume exactly)."""

    step: int = 0
    samples: int = 0
    epoch: int = 0
    consumed: int = 0  # micro-batches of the current epoch already trained on (this rank)
    train_time_s: float = 0.0
    last_eval_mark: int = 0
    last_loss: float = math.nan  # the global batch's mean training loss at the last step
    last_grad_norm: Optional[float] = None  # global gradient norm at the last step (None: off)
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    reached_target: bool = False
    steps_to_target: Optional[int] = None
    epochs_to_target: Optional[float] = None
    time_to_target_s: Optional[float] = None
    diverged: bool = False
    stop_reason: str = ""
    plan_changes: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0  # windows dropped for non-finite loss/gradients (or fp16 overflow)

    def state_dict(self) -> dict[str, Any]:
        """A plain dict of the counters."""
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; a resumed run has not stopped yet."""
        self.__dict__.update(state)
        self.stop_reason = ""

    def outcome(self) -> dict[str, Any]:
        """The counters' part of summary.json: how far the run got and how it ended."""
        return {"steps": self.step, "samples": self.samples, "train_time_s": self.train_time_s,
                **{f"final_{k}": v for k, v in self.metrics.items()},
                "final_train_loss": self.last_loss, "final_grad_norm": self.last_grad_norm,
                "reached_target": self.reached_target, "steps_to_target": self.steps_to_target,
                "epochs_to_target": self.epochs_to_target,
                "time_to_target_s": self.time_to_target_s, "diverged": self.diverged,
                "stop_reason": self.stop_reason, "skipped_steps": self.skipped_steps,
                "plan_changes": self.plan_changes}


@dataclass
class Timer:
    """Data-wait and compute seconds of the current epoch."""

    data_s: float = 0.0
    compute_s: float = 0.0
    eval_s: float = 0.0


def map_resharded_position(state: RunState, old: BatchPlan, old_world: int, new: BatchPlan,
                       is_main: bool) -> BatchPlan:
    """The plan to continue with on this world (``new``, made from the config, or ``old``'s
    grown global batch cut for this world); moves ``state``'s epoch position by samples.

    The position (consumed micro-batches x old micro x old world samples) continues at
    the same sample count when that is a whole number of new micro-batches, else at the
    next window boundary (said in one line).

    Raises:
        ConfigError: the global batch does not divide into this world's micro-batches
            (``build_run``'s plan raises it first for the configured global batch).
    """
    world = new.world_size
    if new.global_size != old.global_size:  # the batch grew before the save: keep it
        _, m, a = resolve_batch(old.global_size, new.micro_size, None, world)
        new = dataclasses.replace(old, micro_size=m, accum_steps=a, world_size=world,
                                  dataset_size=new.dataset_size)
    samples = state.consumed * old.micro_size * old_world
    unit = new.micro_size * world
    if samples % unit == 0:
        consumed = samples // unit
    else:  # no whole new micro-batch ends there: start at the next window boundary
        window = unit * new.accum_steps
        consumed = -(-samples // window) * new.accum_steps
        if is_main:
            print(f"resharding: epoch position {samples} samples is not a whole number of "
                  f"micro-batches of {unit}; continuing at {consumed * unit}", flush=True)
    state.consumed = min(consumed, new.micro_batches_per_epoch)
    return new
