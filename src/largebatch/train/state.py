"""The run's counters, timers and stop flags: the trainer's own state.

``RunState`` is what a checkpoint captures of the loop itself (the trainer saves it with its
plan); ``Timer`` and ``StopFlags`` live for one epoch or one step; ``RunSnapshot`` is the exact
copy of a run that ``Trainer.snapshot`` takes and ``Trainer.restore`` puts back (the LR range
test trains on a run and then undoes it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from largebatch.plan import BatchPlan


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
        """A plain dict of the counters (containers copied)."""
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any], keep_stop_reason: bool = False) -> None:
        """Restore the counters; a resumed run has not stopped yet (unless
        ``keep_stop_reason``: an exact restore of a snapshot)."""
        self.__dict__.update(state)
        if not keep_stop_reason:
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

    def target_reached(self, epoch: float) -> None:
        """Record the first time the target metric was reached."""
        if not self.reached_target:
            self.reached_target, self.steps_to_target = True, self.step
            self.epochs_to_target, self.time_to_target_s = epoch, self.train_time_s


@dataclass
class Timer:
    """Data-wait, compute and evaluation seconds of the current epoch."""

    data_s: float = 0.0
    compute_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class StopFlags:
    """What the ranks agreed on in the last step's collective, and a pending stop request.

    Attributes:
        over_budget: some rank's training time reached ``train.time_budget_s``.
        preempted: some rank was asked to stop (SIGTERM/SIGUSR1) and the run checkpoints.
        nonfinite: some rank saw a non-finite loss or gradient in the last window.
        requested: a signal asked THIS rank to stop (agreed in the next step's collective).
    """

    over_budget: bool = False
    preempted: bool = False
    nonfinite: bool = False
    requested: bool = False


@dataclass
class RunSnapshot:
    """Deep copies of everything a run changes while training (``Trainer.snapshot``)."""

    trainer: dict[str, Any]
    engine: tuple[dict[str, Any], dict[str, Any]]
    schedule: dict[str, Any]
    noise: dict[str, Any]
    policies: dict[str, Any]
    flags: StopFlags
    timer: Timer
    plan: BatchPlan
    loader_epoch: Optional[int]
    training: bool
    rng: dict[str, Any]
