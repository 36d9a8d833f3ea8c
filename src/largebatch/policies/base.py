"""The batch-policy interface: whatever may change the batch plan during a run.

A policy never touches the trainer. At three moments the trainer shows it a ``PolicyView``
(read-only facts of the run and the few services a decision may need) and the policy answers
with plan changes; the trainer applies every change in one place (``Trainer._apply``): the plan,
the schedule's peak LR, the loader's micro size and the re-cut of the epoch, the
``plan_change`` record. Every rank calls every hook at the same step with the same facts, so a
policy's collectives (``view.reduce_mean``) stay matched.

Moments: ``at_epoch_start`` (every epoch after the first, position 0), ``after_step`` (every
applied optimizer step; one that ends the epoch only informs), ``after_eval`` (an evaluation, with its
metrics). ``max_window`` lets a policy shorten the next window (to reach a position where a
coming micro size divides the epoch). A capability a policy does not use is the no-op here.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from largebatch.plan import BatchPlan


@dataclass(frozen=True)
class PlanChange:
    """A change a policy asks for, applied by the trainer from the next step on.

    Attributes:
        action: what the ``plan_change`` record calls it (``grow_batch``, ``reduce_lr``,
            ``adapt``).
        plan: the plan to train with (None: the batch stays).
        reduce_lr: lower the LR by the plateau factor (the schedule's ``reduce_lr``).
        record: what else the record says (why: a reason, the noise scale, a gain).
        announce: a line rank 0 prints ('' for none).
    """

    action: str
    plan: Optional[BatchPlan] = None
    reduce_lr: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    announce: str = ""


@dataclass(frozen=True)
class PolicyView:
    """What a policy may read at a hook (the same on every rank) and may call.

    Attributes:
        plan: the plan in force.
        step: optimizer steps applied so far.
        samples: global samples trained on so far.
        position: this rank's samples into the current epoch.
        epoch_start: whether this is an epoch's start (``at_epoch_start``).
        epoch_end: the step ended the epoch (``after_step``: learn, do not change the plan;
            the next epoch's start decides).
        step_seconds: the last step's wall time (``after_step``).
        micro_batches: the last step's micro-batches (``after_step``).
        noise_raw: the last step's own (|G|², tr(Σ)) estimates, or None.
        metrics: the evaluation's metrics (``after_eval``).
        sample: the first micro-batch of the last window (inputs, labels; on the device).
        reduce_mean: averages a few floats over ranks (a collective; identity on one rank).
        log: writes a record to metrics.jsonl (rank 0).
    """

    plan: BatchPlan
    step: int
    samples: int
    position: int = 0
    epoch_start: bool = False
    epoch_end: bool = False
    step_seconds: float = 0.0
    micro_batches: int = 0
    noise_raw: Optional[tuple[float, float]] = None
    metrics: dict[str, float] = field(default_factory=dict)
    sample: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    reduce_mean: Callable[[list[float]], list[float]] = lambda values: values
    log: Callable[[dict[str, Any]], None] = lambda record: None


class BatchPolicy(ABC):
    """One rule that may change the plan; every hook defaults to 'no change'."""

    #: How ``batch`` config and records name it.
    name = "policy"
    #: Whether it reads the live noise scale (the trainer then measures it).
    needs_noise_scale = False

    def at_epoch_start(self, view: PolicyView) -> Sequence[PlanChange]:
        """At the start of every epoch but the first."""
        return ()

    def after_step(self, view: PolicyView) -> Sequence[PlanChange]:
        """After every applied optimizer step (no change at ``view.epoch_end``)."""
        return ()

    def after_eval(self, view: PolicyView) -> Sequence[PlanChange]:
        """After an evaluation (``view.metrics``)."""
        return ()

    def max_window(self, plan: BatchPlan, position: int) -> Optional[int]:
        """At most this many micro-batches in the next window (None: the plan's window)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs (plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""

    def load_resharded(self, state: dict[str, Any], old_world: int) -> None:
        """Restore a state saved at another world size (default: as saved)."""
        self.load_state_dict(state)


class Policies:
    """The run's policies, asked in order; one stateful part of the checkpoint (by name)."""

    def __init__(self, policies: Sequence[BatchPolicy] = ()) -> None:
        self.policies = list(policies)

    @property
    def needs_noise_scale(self) -> bool:
        """Whether any policy reads the live noise scale."""
        return any(p.needs_noise_scale for p in self.policies)

    def max_window(self, plan: BatchPlan, position: int) -> Optional[int]:
        """The tightest limit any policy puts on the next window (None: none)."""
        limits = [n for p in self.policies if (n := p.max_window(plan, position)) is not None]
        return min(limits) if limits else None

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.policies}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.policies:
            if p.name in state:  # a set from a run without this policy: it starts afresh
                p.load_state_dict(state[p.name])

    def load_resharded(self, state: dict[str, Any], old_world: int) -> None:
        for p in self.policies:
            if p.name in state:
                p.load_resharded(state[p.name], old_world)
