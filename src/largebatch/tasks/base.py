"""The Task interface: what is computed and how it is scored, so the trainer is task-agnostic.

A task owns the model parts (the replicated module the engine wraps, and sharded modules it
must never wrap, such as a class-sharded Partial FC head), the loss of one micro-batch and its
weight in the accumulation window, the evaluation (a dict of global metrics) and the primary
metric (name and mode) that the target, the plateau logic and batch growth follow.

The trainer calls, per optimizer step: ``begin_window`` with the labels of every micro-batch
of the window (a no-op unless the task fixes something per window, like Partial FC's class
sample), then per micro-batch ``loss`` and ``micro_weight``; and ``evaluate`` at its cadence.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from largebatch.config import Config, ConfigError


@dataclass(frozen=True)
class Metric:
    """A named evaluation metric and whether larger ('max') or smaller ('min') is better."""

    name: str
    mode: str

    def better(self, a: float, b: float) -> bool:
        """True when ``a`` is strictly better than ``b``."""
        return a > b if self.mode == "max" else a < b


#: The global training loss of the last step: every run has it (the trainer's), and it is the
#: primary metric of a task that has nothing to evaluate (face training without verification
#: sets).
TRAIN_LOSS = Metric("train_loss", "min")


@dataclass
class TaskParts:
    """The modules a task trains.

    Attributes:
        model: replicated on every rank; the engine wraps it (DDP, DeepSpeed ZeRO).
        sharded: modules whose parameters differ per rank and which do their own
            communication (e.g. a class-sharded head); the engine places them, never wraps.
    """

    model: nn.Module
    sharded: list[nn.Module] = field(default_factory=list)


class Task(ABC):
    """One kind of training problem (classification, face recognition, ...).

    Args:
        cfg: the run configuration.
    """

    name = "base"
    #: Every metric ``evaluate`` returns; the first is the primary one unless overridden.
    metrics: tuple[Metric, ...] = ()

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    # ---- model --------------------------------------------------------------------------
    @abstractmethod
    def build(self) -> TaskParts:
        """Fresh model parts (called after seeding, identically on every rank)."""

    # ---- training -----------------------------------------------------------------------
    def begin_window(self, labels: list[torch.Tensor]) -> None:
        """Called once per optimizer step with this rank's labels of every micro-batch of the
        window, before the first forward pass (default: nothing to fix per window)."""

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch (a 0-d tensor whose backward trains the parts)."""

    def micro_weight(self, n: int, window: int) -> float:
        """Weight of a micro-batch of ``n`` samples in a window of ``window`` samples (this
        rank's counts). The default makes the accumulated gradient the window's sample mean,
        which DDP's averaging turns into the global batch mean."""
        return n / window

    def report_weight(self, n: int, window: int) -> float:
        """Weight of a micro-batch's detached loss in the LOGGED training loss.

        The trainer adds ``loss x report_weight`` over this rank's micro-batches, sums that
        over ranks and divides by the global window's sample count. The default (``n``) is
        right for a loss that is this rank's micro-batch mean. A loss that is already a
        share of the global window's total (Partial FC: summed over the gathered batch,
        divided by the window's global count, the same value on every rank) returns
        ``window``: then sum_ranks(window_r) x sum_micro(loss) / sum_ranks(window_r) is the
        window's loss exactly, whatever the micro-batch sizes.
        """
        return float(n)

    def sharded_optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The optimizer of one of ``TaskParts.sharded`` (the engine steps it at the boundary,
        the LR schedule drives it like the model's)."""
        raise NotImplementedError(f"task {self.name} has sharded modules but no optimizer "
                                  f"for them")

    # ---- what ``largebatch plan`` shows -------------------------------------------------
    def plan_report(self, plan: Any) -> dict[str, Any]:
        """Facts the task adds to ``largebatch plan --json`` for ``plan`` (default: none)."""
        return {}

    def describe_plan(self, plan: Any) -> list[str]:
        """Lines the task adds below the plan's own in ``largebatch plan`` (default: none)."""
        return []

    # ---- evaluation ---------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Any, engine: Any) -> dict[str, float]:
        """Metrics over the WHOLE evaluation set (reduced over ranks), the same on every rank."""

    def primary_metric(self) -> Metric:
        """The metric the target and the plateau logic follow (``train.target_metric``, else
        the task's first metric, else, for a task with nothing to evaluate, ``train_loss``)."""
        name = self.cfg.train.target_metric or \
            (self.metrics[0].name if self.metrics else TRAIN_LOSS.name)
        return self.metric(name, key="train.target_metric")

    def metric(self, name: str, key: str) -> Metric:
        """The metric called ``name`` (``train_loss``: the trainer's, always there); a
        ConfigError naming ``key`` if the task has none."""
        if name == TRAIN_LOSS.name:
            return TRAIN_LOSS
        for m in self.metrics:
            if m.name == name:
                return m
        names = "|".join(m.name for m in self.metrics)
        raise ConfigError(f"{key}={name!r} is not a metric of task {self.name} ({names})")
