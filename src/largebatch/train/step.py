"""One optimizer step of one rank: the window's micro-batches, one collective, the update.

The step fetches the whole window first (a task may fix something from all of its labels
before the first forward pass: Partial FC samples its classes once per window, so accumulation
equals one big batch), runs forward and backward per micro-batch inside the engine's
accumulation context, then makes the step's one small collective: the loss sum, the sample
count and every rank-local stop fact, so that all ranks apply or drop the update alike. It
reports what happened (``StepOutcome``); the trainer keeps the counts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from largebatch.data.loaders import Batch
from largebatch.engines.base import Engine
from largebatch.noise.scale import NoiseScaleMonitor
from largebatch.optim.schedules import LRSchedule
from largebatch.tasks.base import Task
from largebatch.train.state import Timer


@dataclass(frozen=True)
class StepOutcome:
    """What one step did, as every rank agreed on it.

    Attributes:
        loss: the global batch's mean loss (NaN when some rank's was not finite).
        grad_norm: the global gradient norm (None when nothing asked for it).
        applied: whether the update was applied.
        nonfinite: some rank saw a non-finite loss or gradient (the update was dropped).
        over_budget: some rank's training time reached the time budget.
        preempted: some rank was asked to stop (a signal).
    """

    loss: float
    grad_norm: Optional[float]
    applied: bool
    nonfinite: bool = False
    over_budget: bool = False
    preempted: bool = False


class StepRunner:
    """Runs optimizer steps for one rank.

    Args:
        task: the micro-batch loss, its weight in the window and in the logged loss.
        engine: wrapping, accumulation, the update and every collective.
        schedule: stepped once per applied update.
        noise: the live noise-scale estimate (its values ride in the step's collective).
        time_budget_s: ``train.time_budget_s`` (0: none).
        grad_norm: measure the gradient norm every step (``log.grad_norm``).
    """

    def __init__(self, task: Task, engine: Engine, schedule: LRSchedule,
                 noise: NoiseScaleMonitor, time_budget_s: float = 0.0,
                 grad_norm: bool = False) -> None:
        self.task, self.engine, self.schedule, self.noise = task, engine, schedule, noise
        self.time_budget_s, self.grad_norm = time_budget_s, grad_norm
        self.model = engine.model
        self.last_sample: Optional[Batch] = None  # the window's first micro-batch
        self._sync = engine.device.type == "cuda"  # honest timings need the GPU to finish

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor,
                         weight: float) -> torch.Tensor:
        """Loss of one micro-batch; backward of ``weight`` x loss. Returns the detached loss."""
        with self.engine.autocast():
            loss = self.task.loss(self.model, x, y)
        self.engine.backward(loss * weight)
        return loss.detach()

    def run(self, batches: Iterator[Batch], n_micro: int, window_samples: int, timer: Timer,
            spent_s: float = 0.0, stop_requested: bool = False) -> StepOutcome:
        """One optimizer step over ``n_micro`` micro-batches holding ``window_samples`` samples
        of this rank. ``spent_s``: training seconds before this step (the time budget);
        ``stop_requested``: this rank was asked to stop. Adds to ``timer``'s data and compute."""
        t0 = time.perf_counter()
        device = self.engine.device
        window = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                  for x, y in (next(batches) for _ in range(n_micro))]
        t1 = time.perf_counter()
        timer.data_s += t1 - t0
        self.last_sample = window[0]
        self.task.begin_window([y for _, y in window])
        # float64: the sum is later added across ranks and divided; keep the last bits.
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, (x, y) in enumerate(window):
            with (self.engine.accumulate(is_boundary=i == n_micro - 1),
                  self.noise.micro(len(y), window_samples)):
                loss = self.forward_backward(x, y, self.task.micro_weight(len(y), window_samples))
            total += loss.double() * self.task.report_weight(len(y), window_samples)
        loss_sum = float(total)  # float() waits for the device
        bad = not math.isfinite(loss_sum) or not self.engine.grads_finite()
        agreed = self.agree(loss_sum, window_samples, bad,
                            spent_s + time.perf_counter() - t0, stop_requested)
        grad_norm, applied = None, not agreed["nonfinite"]
        if applied:
            sq_big = self.noise.global_sq_norm()  # the reduced gradient, before the step
            grad_norm, applied = self.engine.step(compute_norm=self.grad_norm)
        else:  # nothing of this window may reach the next one's accumulated gradients
            self.engine.zero_grad()
        if applied:
            self.schedule.step()
            self.noise.update(agreed["extra"], self.engine.world_size, window_samples, sq_big)
        if self._sync:
            torch.cuda.synchronize()
        # Compute = everything after the data arrived: forward/backward, the step's collective
        # and the update (data + compute is the step's time).
        timer.compute_s += time.perf_counter() - t1
        return StepOutcome(agreed["loss"], grad_norm, applied, agreed["nonfinite"],
                           agreed["over_budget"], agreed["preempted"])

    def agree(self, loss_sum: float, samples: int, nonfinite: bool, spent_s: float,
              stop_requested: bool) -> dict[str, Any]:
        """The global batch's mean loss, and the stop facts every rank acts on with it.

        Time budget, pre-emption and a non-finite loss or gradient are rank-local facts that
        every rank must act on at the same step (else one waits forever in the next
        all-reduce): they travel as 0/1 in the same sum-reduce as the loss sum and sample count
        (one tiny collective per step, only when distributed); a sum > 0 means "some rank said
        yes". The noise scale's local norms ride along (``extra``: their sums).
        """
        over = bool(self.time_budget_s) and spent_s >= self.time_budget_s
        values = [loss_sum if math.isfinite(loss_sum) else 0.0, float(samples), float(over),
                  float(stop_requested), float(nonfinite),
                  *self.noise.local_values(samples)]
        if self.engine.world_size > 1:
            values = self.engine.reduce_scalars(values, op="sum")
        bad = values[4] > 0
        return {"loss": math.nan if bad else values[0] / values[1], "nonfinite": bad,
                "over_budget": values[2] > 0, "preempted": values[3] > 0, "extra": values[5:]}
