"""The training loop: read it top to bottom; it never asks which engine it runs on.

One optimizer step = one accumulation window of ``plan.accum_steps`` micro-batches per rank.
Each micro-batch loss is weighted by its share of the window's samples, so the accumulated
gradient is the window mean even when the epoch's last window or micro-batch is short.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from largebatch.config import Config
from largebatch.data.loaders import Batch, BatchLoader
from largebatch.engines.base import Engine
from largebatch.metrics import MetricsLogger
from largebatch.optim.schedules import LRSchedule
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
    last_loss: float = math.nan
    val_loss: float = math.nan
    val_acc: float = math.nan
    reached_target: bool = False
    steps_to_target: Optional[int] = None
    epochs_to_target: Optional[float] = None
    time_to_target_s: Optional[float] = None
    diverged: bool = False
    stop_reason: str = ""
    plan_changes: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """A plain dict of the counters."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; a resumed run has not stopped yet."""
        self.__dict__.update(state)
        self.stop_reason = ""


@dataclass
class Timer:
    """Data-wait and compute seconds of the current epoch."""

    data_s: float = 0.0
    compute_s: float = 0.0
    eval_s: float = 0.0


class Trainer:
    """Drives train_step / evaluate over epochs for one rank.

    Args:
        cfg: the run configuration.
        engine: the engine that owns the model, the optimizer and all communication.
        schedule: the LR schedule, stepped once per optimizer step.
        plan: the batch plan (may be replaced when the batch grows on a plateau).
        train_loader: micro-batches for this rank.
        eval_loader: this rank's share of the test split.
        logger: the metrics sink (a no-op off rank 0).
    """

    def __init__(self, cfg: Config, engine: Engine, schedule: LRSchedule, plan: BatchPlan,
                 train_loader: BatchLoader, eval_loader: BatchLoader,
                 logger: MetricsLogger) -> None:
        self.cfg, self.engine, self.schedule, self.plan = cfg, engine, schedule, plan
        self.initial_plan = plan
        self.model = engine.model
        self.train_loader, self.eval_loader, self.logger = train_loader, eval_loader, logger
        self.state = RunState()
        self.timer = Timer()
        self.stop_requested = False  # set by a signal handler (pre-emption): save, then stop
        self._over_budget = self._preempted = False
        self.checkpointer: Optional[Any] = None  # called as checkpointer(trainer) to save
        self._sync = engine.device.type == "cuda"  # honest timings need the GPU to finish

    # ---- one step ---------------------------------------------------------------------------
    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor,
                              weight: float) -> torch.Tensor:
        """Loss of one micro-batch; backward of ``weight`` x loss. Returns the detached loss."""
        with self.engine.autocast():
            loss = F.nll_loss(self.model(x), y)
        self.engine.backward(loss * weight)
        return loss.detach()

    def train_step(self, batches: Iterator[Batch], n_micro: int, window_samples: int) -> float:
        """One optimizer step over ``n_micro`` micro-batches holding ``window_samples`` samples.

        Returns this rank's mean training loss over the window.
        """
        total = torch.zeros((), device=self.engine.device)
        for i in range(n_micro):
            t0 = time.perf_counter()
            x, y = next(batches)
            x = x.to(self.engine.device, non_blocking=True)
            y = y.to(self.engine.device, non_blocking=True)
            t1 = time.perf_counter()
            with self.engine.accumulate(is_boundary=i == n_micro - 1):
                loss = self.forward_backward_step(x, y, len(y) / window_samples)
            total += loss * len(y)
            self.timer.data_s += t1 - t0
            self.timer.compute_s += time.perf_counter() - t1
        t2 = time.perf_counter()
        self.engine.step()
        self.schedule.step()
        mean_loss = float(total) / window_samples  # float() waits for the device
        if self._sync:
            torch.cuda.synchronize()
        self.timer.compute_s += time.perf_counter() - t2
        return mean_loss

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy over the whole split (sums all-reduced over ranks)."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.engine.device)
        for x, y in self.eval_loader:
            with self.engine.autocast():
                out = self.model(x.to(self.engine.device))
            y = y.to(self.engine.device)
            sums[0] += F.nll_loss(out.float(), y, reduction="sum")
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
        self.model.train()
        loss_sum, correct, count = self.engine.reduce_scalars(sums.tolist(), op="sum")
        return loss_sum / count, correct / count

    def _evaluate_and_decide(self) -> None:
        """Evaluate, record, check the target, and let the plateau logic act."""
        s = self.state
        t0 = time.perf_counter()
        s.val_loss, s.val_acc = self.evaluate()
        self.timer.eval_s += time.perf_counter() - t0
        s.last_eval_mark = s.samples
        epoch = self._epoch_progress()
        self.logger.log({"kind": "eval", "step": s.step, "epoch": epoch, "samples": s.samples,
                         "val_loss": s.val_loss, "val_acc": s.val_acc, "time_s": s.train_time_s})
        target = self.cfg.train.target_acc
        if target > 0 and not s.reached_target and s.val_acc >= target:
            s.reached_target, s.steps_to_target = True, s.step
            s.epochs_to_target, s.time_to_target_s = epoch, s.train_time_s
        metric = s.val_loss if self.cfg.schedule.plateau.metric == "val_loss" else s.val_acc
        action = self.schedule.on_eval(metric)  # averages over ranks before deciding
        if action == "grow_batch":
            self._grow_batch()

    def _grow_batch(self) -> None:
        """Smith et al. 2018: grow the batch through accumulation; else lower the LR."""
        grown = self.plan.grown(self.cfg.schedule.plateau.factor)
        change = {"kind": "plan_change", "step": self.state.step, "samples": self.state.samples}
        if grown is None:
            self.schedule.reduce_lr()
            change.update(action="reduce_lr", lr=self.schedule.lr)
        else:
            self.plan = grown
            change.update(action="grow_batch", global_size=grown.global_size,
                          accum_steps=grown.accum_steps)
        self.state.plan_changes.append(change)
        self.logger.log(change)

    # ---- the loop ---------------------------------------------------------------------------
    def _epoch_progress(self) -> float:
        return self.state.epoch + self.state.consumed / max(1, self._epoch_micro)

    def _should_stop(self) -> str:
        t = self.cfg.train
        s = self.state
        if s.diverged:
            return "diverged"
        if self._preempted:
            return "preempted"
        if t.stop_at_target and s.reached_target:
            return "target_reached"
        if t.max_steps and s.step >= t.max_steps:
            return "max_steps"
        if self._over_budget:
            return "time_budget"
        if self._epoch_progress() >= t.epochs - 1e-9:
            return "epochs"
        return ""

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every_samples
        if every:
            return self.state.samples // every > self.state.last_eval_mark // every
        return self.state.consumed == self._epoch_micro  # epoch end

    def _agree_on_stop_flags(self, loss: float) -> None:
        """Divergence, time budget and pre-emption are rank-local facts; every rank must act
        on them at the same step (else one waits forever in the next all-reduce), so they are
        max-reduced: one tiny collective per step, only when distributed."""
        t, s = self.cfg.train, self.state
        flags = [float(not math.isfinite(loss) or loss > t.max_loss),
                 float(bool(t.time_budget_s) and s.train_time_s >= t.time_budget_s),
                 float(self.stop_requested and self.checkpointer is not None)]
        if self.engine.world_size > 1:
            flags = self.engine.reduce_scalars(flags, op="max")
        s.diverged = s.diverged or flags[0] > 0
        self._over_budget, self._preempted = flags[1] > 0, flags[2] > 0

    def _maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint.every_steps
        s = self.state
        if self.checkpointer is not None and (s.stop_reason == "preempted"
                                              or (every and s.step % every == 0)):
            self.checkpointer(self)

    def _run_epoch(self, progress: Any) -> None:
        s, plan = self.state, self.plan
        self.train_loader.set_epoch(s.epoch)
        batches = iter(self.train_loader)
        self._epoch_micro = plan.micro_batches_per_epoch
        for _ in range(s.consumed):  # resuming mid-epoch: the same order, minus what was seen
            next(batches)
        rank_samples = min(s.consumed * plan.micro_size, plan.shard_size)
        self.timer = Timer()
        epoch_start = time.perf_counter()
        while s.consumed < self._epoch_micro and not s.stop_reason:
            n_micro = min(self.plan.accum_steps, self._epoch_micro - s.consumed)
            window = min(n_micro * plan.micro_size, plan.shard_size - rank_samples)
            lr = self.schedule.lr  # the LR this step uses (the schedule moves on inside)
            t0 = time.perf_counter()
            loss = self.train_step(batches, n_micro, window)
            s.train_time_s += time.perf_counter() - t0
            s.consumed += n_micro
            rank_samples += window
            s.step += 1
            s.samples += window * self.engine.world_size
            s.last_loss = loss
            self._agree_on_stop_flags(loss)
            if s.step % self.cfg.log.every_steps == 0 or s.diverged:
                self.logger.log({"kind": "train", "step": s.step,
                                 "epoch": self._epoch_progress(), "samples": s.samples,
                                 "loss": loss, "lr": lr, "time_s": s.train_time_s})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self._eval_due() and not s.diverged:
                self._evaluate_and_decide()
            s.stop_reason = self._should_stop()
            self._maybe_checkpoint()
        # Evaluation is excluded from the epoch's training time, as from time-to-target.
        wall = time.perf_counter() - epoch_start
        self.logger.log({"kind": "epoch", "epoch": s.epoch, "step": s.step,
                         "epoch_time_s": wall - self.timer.eval_s,
                         "data_time_s": self.timer.data_s, "compute_time_s": self.timer.compute_s,
                         "eval_time_s": self.timer.eval_s, "micro_batches": s.consumed})
        if s.consumed == self._epoch_micro:
            s.epoch += 1
            s.consumed = 0

    def fit(self) -> dict[str, Any]:
        """Train until epochs, max_steps, the time budget, divergence or the target."""
        self._epoch_micro = self.plan.micro_batches_per_epoch
        wall_start = time.perf_counter()
        progress = None
        if self.engine.is_main and self.cfg.log.progress:
            from tqdm import tqdm
            progress = tqdm(total=self._planned_steps(), unit="step", dynamic_ncols=True,
                            mininterval=1.0, leave=False)
        self.model.train()
        while not self.state.stop_reason:
            self._run_epoch(progress)
        if progress is not None:
            progress.close()
        done = self.state.stop_reason == "preempted" or self.state.diverged
        if self.state.last_eval_mark != self.state.samples and not done:
            self._evaluate_and_decide()
        return self.summary(time.perf_counter() - wall_start)

    def _planned_steps(self) -> int:
        t = self.cfg.train
        steps = math.ceil(t.epochs * self.plan.steps_per_epoch)
        return min(steps, t.max_steps) if t.max_steps else steps

    # ---- state (exact resume) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks: counters, current plan, schedule, model, optimizer."""
        return {"run": self.state.state_dict(), "plan": self.plan.to_json(),
                "schedule": self.schedule.state_dict(), "engine": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``: the same step, data position, LR and batch plan."""
        self.state.load_state_dict(state["run"])
        self.plan = BatchPlan.from_json(state["plan"])
        self.schedule.load_state_dict(state["schedule"])
        self.engine.load_state_dict(state["engine"])

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The run's outcome (summary.json)."""
        s = self.state
        return {"steps": s.step, "samples": s.samples, "epochs_run": self._epoch_progress(),
                "wall_s": wall_s, "train_time_s": s.train_time_s,
                "final_val_acc": s.val_acc, "final_val_loss": s.val_loss,
                "final_train_loss": s.last_loss, "reached_target": s.reached_target,
                "steps_to_target": s.steps_to_target, "epochs_to_target": s.epochs_to_target,
                "time_to_target_s": s.time_to_target_s, "diverged": s.diverged,
                "stop_reason": s.stop_reason, "final_lr": self.schedule.lr,
                "plan_changes": s.plan_changes, "plan": self.initial_plan.to_json()}
