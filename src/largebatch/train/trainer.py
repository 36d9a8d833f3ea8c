"""The training loop: read it top to bottom; it never asks which engine or task it runs.

One optimizer step = one accumulation window of ``plan.accum_steps`` micro-batches per rank.
Each micro-batch loss is weighted by its share of the window's samples, so the accumulated
gradient is the window mean even when the epoch's last window or micro-batch is short.

Every logged training figure is the global batch's: the loss is the sample-weighted mean over
all ranks (summed in the one small collective each step already makes for the stop flags), and
the gradient norm is that of the averaged gradient, which every rank holds after the sync.
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator, Optional

import torch

from largebatch.config import Config
from largebatch.data.loaders import Batch, BatchLoader
from largebatch.engines.base import Engine
from largebatch.metrics import MetricsLogger
from largebatch.noise.scale import NoiseScaleMonitor
from largebatch.optim.schedules import LRSchedule
from largebatch.plan import BatchPlan
from largebatch.train.state import RunState, Timer, map_resharded_position
from largebatch.policies.plateau import grow_batch, plateau_metric
from largebatch.tasks.base import Task
from largebatch.policies.goodput import adapt_batch, build_adapter, recut_epoch


class Trainer:
    """Drives train_step / evaluate over epochs for one rank.

    Args:
        cfg: the run configuration.
        task: what is computed (micro-batch loss and weight) and how it is scored.
        engine: the engine that owns the model, the optimizer and all communication.
        schedule: the LR schedule, stepped once per optimizer step.
        plan: the batch plan (may be replaced when the batch grows on a plateau).
        train_loader: micro-batches for this rank.
        eval_loader: this rank's share of the test split.
        logger: the metrics sink (a no-op off rank 0).
    """

    def __init__(self, cfg: Config, task: Task, engine: Engine, schedule: LRSchedule,
                 plan: BatchPlan, train_loader: BatchLoader, eval_loader: BatchLoader,
                 logger: MetricsLogger) -> None:
        self.cfg, self.task, self.engine, self.schedule, self.plan = cfg, task, engine, schedule, plan
        self.target = task.primary_metric()
        self.plateau_metric = plateau_metric(cfg, task)
        self.initial_plan = plan
        self.model = engine.model
        self.train_loader, self.eval_loader, self.logger = train_loader, eval_loader, logger
        self.state = RunState()
        self.timer = Timer()
        self.stop_requested = False  # set by a signal handler (pre-emption): save, then stop
        self._over_budget = self._preempted = self._nonfinite = False
        self.checkpointer: Optional[Any] = None  # called as checkpointer(trainer) to save
        self._sync = engine.device.type == "cuda"  # honest timings need the GPU to finish
        # train.noise_scale (off: every call on it is a no-op, nothing joins the collective)
        # batch.adapt=goodput (FixedBatch: off) reads the noise scale: it turns the estimate on.
        self.adapter = build_adapter(cfg, plan, train_loader)
        self.last_micro_batch: Optional[Batch] = None  # what the adapter's profile times
        self.noise = NoiseScaleMonitor(engine, cfg.train.noise_scale or self.adapter.active,
                                       plan.accum_steps, engine.describe())
        self._reduced_extra: list[float] = []

    # ---- one step ---------------------------------------------------------------------------
    def forward_backward_step(self, x: torch.Tensor, y: torch.Tensor,
                              weight: float) -> torch.Tensor:
        """Loss of one micro-batch; backward of ``weight`` x loss. Returns the detached loss."""
        with self.engine.autocast():
            loss = self.task.loss(self.model, x, y)
        self.engine.backward(loss * weight)
        return loss.detach()

    def train_step(self, batches: Iterator[Batch], n_micro: int,
                   window_samples: int) -> tuple[float, Optional[float], bool]:
        """One optimizer step over ``n_micro`` micro-batches holding ``window_samples`` samples.

        The step's one collective (loss, stop flags, non-finite flag) runs between the last
        backward and the update, so every rank decides alike whether to apply it.

        Returns:
            The global batch's mean loss, the global gradient norm (None when neither
            clipping nor ``log.grad_norm`` asks the engine for it), and whether the update
            was applied (False: dropped for non-finite loss or gradients on some rank, or
            an fp16 grad-scaler overflow).
        """
        # The whole window is fetched first: a task may fix something from all of its labels
        # before the first forward pass (Partial FC samples its classes once per window, so
        # accumulation equals one big batch).
        t0 = time.perf_counter()
        window = []
        for _ in range(n_micro):
            x, y = next(batches)
            window.append((x.to(self.engine.device, non_blocking=True),
                           y.to(self.engine.device, non_blocking=True)))
        t1 = time.perf_counter()
        self.timer.data_s += t1 - t0
        if self.adapter.active:
            self.last_micro_batch = window[0]
        self.task.begin_window([y for _, y in window])
        # float64: the sum is later added across ranks and divided; keep the last bits.
        total = torch.zeros((), dtype=torch.float64, device=self.engine.device)
        for i, (x, y) in enumerate(window):
            with (self.engine.accumulate(is_boundary=i == n_micro - 1),
                  self.noise.micro(len(y), window_samples)):
                loss = self.forward_backward_step(
                    x, y, self.task.micro_weight(len(y), window_samples))
            total += loss.double() * self.task.report_weight(len(y), window_samples)
        loss_sum = float(total)  # float() waits for the device
        bad = not math.isfinite(loss_sum) or not self.engine.grads_finite()
        loss, any_bad = self._agree_on_loss_and_stop_flags(
            loss_sum, window_samples, bad, time.perf_counter() - t0,
            extra=self.noise.local_values(window_samples))
        grad_norm, applied = None, not any_bad
        if applied:
            sq_big = self.noise.global_sq_norm()  # the reduced gradient, before the step
            grad_norm = self.engine.step(compute_norm=self.cfg.log.grad_norm)
            # fp16: the grad scaler skipped optimizer.step() on inf/NaN gradients.
            applied = not self.engine.last_step_skipped
        else:  # nothing of this window may reach the next one's accumulated gradients
            self.engine.zero_grad()
        if applied:
            self.schedule.step()
            self.noise.update(self._reduced_extra, self.engine.world_size, window_samples,
                              sq_big)
        if self._sync:
            torch.cuda.synchronize()
        # Compute = everything after the data arrived: forward/backward, the step's collective
        # and the update (data + compute is the step's time).
        self.timer.compute_s += time.perf_counter() - t1
        return loss, grad_norm, applied

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the whole evaluation set (global, the same on every rank)."""
        self.model.eval()
        metrics = self.task.evaluate(self.model, self.eval_loader, self.engine)
        self.model.train()
        return metrics

    def _evaluate_and_decide(self) -> None:
        """Evaluate, record, check the target, and let the plateau logic act."""
        s = self.state
        t0 = time.perf_counter()
        s.metrics = self.evaluate()
        self.timer.eval_s += time.perf_counter() - t0
        s.last_eval_mark = s.samples
        epoch = self._epoch_progress()
        self.logger.log({"kind": "eval", "step": s.step, "epoch": epoch, "samples": s.samples,
                         **s.metrics, "time_s": s.train_time_s})
        target, value = self.cfg.train.target_acc, s.metrics[self.target.name]
        if target > 0 and not s.reached_target and not self.target.better(target, value):
            s.reached_target, s.steps_to_target = True, s.step
            s.epochs_to_target, s.time_to_target_s = epoch, s.train_time_s
        action = None
        if self.plateau_metric is not None:  # (the schedule averages it over ranks first)
            action = self.schedule.on_eval(s.metrics[self.plateau_metric.name])
        if action == "grow_batch":
            grow_batch(self)

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

    def _on_dropped_step(self, loss: float) -> bool:
        """A window whose update was not applied: counted (skip, fp16 overflow) or the run
        stops at the last good step, which gets a set, as diverged (stop). Returns True to
        stop."""
        s = self.state
        if not self._nonfinite or self.cfg.train.nonfinite == "skip":
            s.skipped_steps += 1
            self.logger.log({"kind": "skip", "step": s.step, "samples": s.samples,
                             "loss": loss, "skipped_steps": s.skipped_steps,
                             "reason": "nonfinite" if self._nonfinite else "fp16_overflow"})
            return False
        # Divergence, as the study counts it (diverged_step = the last good step); the record
        # of the attempted step is the one a resume from the last good set trims again.
        s.diverged, s.stop_reason = True, "diverged"
        self.logger.log({"kind": "train", "step": s.step + 1, "epoch": self._epoch_progress(),
                         "samples": s.samples, "loss": loss, "applied": False,
                         "time_s": s.train_time_s, "skipped_steps": s.skipped_steps})
        if self.engine.is_main:
            print(f"largebatch: non-finite loss or gradients at step {s.step + 1} (loss "
                  f"{loss}); stopped with the last good state, step {s.step}", flush=True)
        self._maybe_checkpoint()
        return True

    def _agree_on_loss_and_stop_flags(self, loss_sum: float, samples: int, nonfinite: bool,
                                      elapsed_s: float,
                                      extra: Optional[list[float]] = None) -> tuple[float, bool]:
        """The global batch's mean loss, and the stop decisions every rank takes with it.

        Time budget and pre-emption are rank-local facts; every rank must act on them at the
        same step (else one waits forever in the next all-reduce). They travel as 0/1 in the
        same sum-reduce as the loss sum and sample count (one tiny collective per step, only
        when distributed), and a sum > 0 means "some rank said yes". Divergence is decided on
        the reduced global loss, which every rank holds bit for bit, so all ranks agree.

        A non-finite loss or gradient on any rank (``nonfinite``) is a flag too: it is
        agreed before the update, so every rank drops (or stops at) the same step.

        ``extra`` values (the noise-scale estimate's local norms) ride along in the same
        sum-reduce; their sums are left in ``self._reduced_extra``.

        Returns:
            The sample-weighted mean training loss over all ranks' windows, and whether some
            rank saw a non-finite loss or gradient.
        """
        t, s = self.cfg.train, self.state
        spent = s.train_time_s + elapsed_s  # this step's time so far counts
        values = [loss_sum if math.isfinite(loss_sum) else 0.0, float(samples),
                  float(bool(t.time_budget_s) and spent >= t.time_budget_s),
                  float(self.stop_requested and self.checkpointer is not None),
                  float(nonfinite), *(extra or ())]
        if self.engine.world_size > 1:
            values = self.engine.reduce_scalars(values, op="sum")
        self._reduced_extra = values[5:]
        self._nonfinite = values[4] > 0
        loss = math.nan if self._nonfinite else values[0] / values[1]
        s.diverged = s.diverged or (not self._nonfinite and loss > t.max_loss)
        self._over_budget, self._preempted = values[2] > 0, values[3] > 0
        return loss, self._nonfinite

    def _maybe_checkpoint(self) -> None:
        """A set every checkpoint.every_steps and at the last step, whatever ended the run
        (pre-emption included): before the closing evaluation, as an uninterrupted longer
        run would be at that step."""
        every = self.cfg.checkpoint.every_steps
        s = self.state
        if self.checkpointer is None or getattr(self.checkpointer, "_last_step", None) == s.step:
            return  # this step's set exists (a stop right after a periodic set)
        if s.stop_reason or (every and s.step % every == 0):
            self.checkpointer(self)

    def _finished_before_start(self) -> Optional[dict[str, Any]]:
        """A requeued or re-launched run whose stop condition already holds does no step
        (the loop checks it only after a step); the stored summary when it is all done."""
        t, s = self.cfg.train, self.state
        self._over_budget = bool(t.time_budget_s) and s.train_time_s >= t.time_budget_s
        s.stop_reason = self._should_stop()
        finished = None if self.checkpointer is None else self.checkpointer.finished(s.stop_reason)
        self.fit_over = finished is not None
        return finished

    def _mark_done(self, summary: dict[str, Any]) -> None:
        """The done marker next to the final set (not after a pre-emption: that run goes on)."""
        if self.checkpointer is not None and self.state.stop_reason != "preempted":
            self.checkpointer.mark_done(self, summary)
        self.fit_over = True  # signals no longer ask for a checkpoint (see watch_preemption)

    def _run_epoch(self, progress: Any) -> None:
        s = self.state
        if s.consumed == 0 and s.step:
            adapt_batch(self, position=0, epoch_start=True)
        plan = self.plan
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
            # (a micro size change may need an aligned window)
            n_micro = self.adapter.window_micro_batches(n_micro, rank_samples, plan.micro_size)
            window = min(n_micro * plan.micro_size, plan.shard_size - rank_samples)
            lr = self.schedule.lr  # the LR this step uses (the schedule moves on inside)
            t0 = time.perf_counter()
            loss, grad_norm, applied = self.train_step(batches, n_micro, window)
            s.train_time_s += time.perf_counter() - t0
            s.consumed += n_micro  # a dropped window's data is consumed all the same
            rank_samples += window
            if not applied and self._on_dropped_step(loss):
                break
            if applied:
                s.step += 1
                s.samples += window * self.engine.world_size
                s.last_loss, s.last_grad_norm = loss, grad_norm
                self.adapter.observe(plan.micro_size, n_micro, time.perf_counter() - t0,
                                     self.noise.raw)
            if applied and (s.step % self.cfg.log.every_steps == 0 or s.diverged):
                self.logger.log({"kind": "train", "step": s.step,
                                 "epoch": self._epoch_progress(), "samples": s.samples,
                                 "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                 "time_s": s.train_time_s, "skipped_steps": s.skipped_steps,
                                 **self.noise.metrics})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if self._eval_due() and not s.diverged:
                self._evaluate_and_decide()
            if (applied and s.consumed < self._epoch_micro  # (an epoch's end decides next)
                    and adapt_batch(self, position=rank_samples)):
                batches, plan = recut_epoch(self, rank_samples)  # a new micro size
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
        finished = self._finished_before_start()
        if finished is not None:
            return finished
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
        done = self.state.stop_reason in ("preempted", "nonfinite") or self.state.diverged
        if self.state.last_eval_mark != self.state.samples and not done:
            self._evaluate_and_decide()
        summary = self.summary(time.perf_counter() - wall_start)
        self._mark_done(summary)
        return summary

    def _planned_steps(self) -> int:
        t = self.cfg.train
        steps = math.ceil(t.epochs * self.plan.steps_per_epoch)
        return min(steps, t.max_steps) if t.max_steps else steps

    # ---- state (exact resume) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything shared by all ranks: counters, current plan, schedule, model, optimizer."""
        engine = self.engine.state_dict()
        # A rank's own part (e.g. its head shard) goes to that rank's file, not rank 0's.
        per_rank = engine.pop("per_rank", None)
        state = {"run": self.state.state_dict(), "plan": self.plan.to_json(),
                 "schedule": self.schedule.state_dict(), "engine": engine, "per_rank": per_rank}
        if self.noise.enabled:  # the estimate's EMAs, so a resumed run continues them
            state["noise_scale"] = self.noise.state_dict()
        state["adapt"] = self.adapter.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``: the same step, data position, LR and batch plan."""
        self.state.load_state_dict(state["run"])
        old_plan = BatchPlan.from_json(state["plan"])
        if state.get("resharded_from") is None:
            self.plan = old_plan
        else:  # another world size: self.plan was made for this world from the config
            self.plan = map_resharded_position(self.state, old_plan, int(state["resharded_from"]),
                                               self.plan, self.engine.is_main)
        self.schedule.load_state_dict(state["schedule"])
        self.noise.load_state_dict(state.get("noise_scale"))
        self.adapter.load_state_dict(state.get("adapt"),
                                     resharded=state.get("resharded_from") is not None)
        if self.adapter.active and self.plan.micro_size != self.train_loader.batch_size:
            self.train_loader.set_batch_size(self.plan.micro_size)  # adapted before the save
        self.engine.load_state_dict({**state["engine"], "per_rank": state.get("per_rank"),
                                     "per_rank_all": state.get("per_rank_all")})
        self.logger.drop_after(self.state.step)  # what a killed run logged past this set

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The run's outcome (summary.json)."""
        return {"epochs_run": self._epoch_progress(), "wall_s": wall_s,
                **{f"final_{m.name}": math.nan for m in self.task.metrics},
                **self.state.outcome(), "final_lr": self.schedule.lr, **self.noise.summary(),
                "plan": self.initial_plan.to_json()}
