"""The training loop: read it top to bottom; it never asks which engine or task it runs.

One optimizer step = one accumulation window of micro-batches per rank; the plan says how many
(``BatchPlan.window``). Each micro-batch loss is weighted by its share of the window's samples,
so the accumulated gradient is the window mean even when the epoch's last window or micro-batch
is short. Whatever may change the plan during a run is a policy (``largebatch.policies``); the
trainer applies their changes in one place, ``_apply``.

Every logged training figure is the global batch's: the loss is the sample-weighted mean over
all ranks (summed in the one small collective each step already makes for the stop flags), and
the gradient norm is that of the averaged gradient, which every rank holds after the sync.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterator, Optional

import torch

from largebatch.config import Config
from largebatch.data.loaders import Batch, BatchLoader
from largebatch.engines.base import Engine
from largebatch.io import rng_state, set_rng_state
from largebatch.metrics import MetricsLogger
from largebatch.noise.scale import NoiseScaleMonitor
from largebatch.optim.schedules import LRSchedule
from largebatch.plan import BatchPlan
from largebatch.policies.base import PlanChange, Policies, PolicyView
from largebatch.tasks.base import Task
from largebatch.train.state import RunSnapshot, RunState, StopFlags, Timer
from largebatch.train.step import StepRunner


class Trainer:
    """Drives train_step / evaluate over epochs for one rank.

    Args:
        cfg: the run configuration.
        task: what is computed (micro-batch loss and weight) and how it is scored.
        engine: the engine that owns the model, the optimizer and all communication.
        schedule: the LR schedule, stepped once per optimizer step.
        plan: the batch plan to start with (policies may change it during the run).
        train_loader: micro-batches for this rank.
        eval_loader: this rank's share of the evaluation set.
        logger: the metrics sink (a no-op off rank 0).
        noise: the live noise-scale estimate (a no-op when off).
        policies: what may change the plan during the run.
        checkpointer: saves the run's registered parts (``checkpoint.Checkpointer``); None
            for a run that writes no checkpoint sets.
    """

    def __init__(self, cfg: Config, task: Task, engine: Engine, schedule: LRSchedule,
                 plan: BatchPlan, train_loader: BatchLoader, eval_loader: BatchLoader,
                 logger: MetricsLogger, noise: NoiseScaleMonitor, policies: Policies,
                 checkpointer: Optional[Any] = None) -> None:
        self.cfg, self.task, self.engine, self.schedule = cfg, task, engine, schedule
        self.plan = self.initial_plan = plan
        self.model = engine.model
        self.train_loader, self.eval_loader, self.logger = train_loader, eval_loader, logger
        self.noise, self.policies, self.checkpointer = noise, policies, checkpointer
        self.target = task.primary_metric()
        self.state, self.timer, self.flags = RunState(), Timer(), StopFlags()
        self.done = False  # fit() has returned: a signal no longer asks for a checkpoint
        self.steps = StepRunner(task, engine, schedule, noise, cfg.train.time_budget_s,
                                cfg.log.grad_norm)

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Batch], n_micro: int,
                   window_samples: int) -> tuple[float, Optional[float], bool]:
        """One optimizer step over ``n_micro`` micro-batches holding ``window_samples`` samples
        (``StepRunner.run``); the ranks' agreed stop facts become the trainer's. Returns the
        global batch's mean loss, the global gradient norm (None when nothing asks for it) and
        whether the update was applied (False: non-finite on some rank, or an fp16 overflow)."""
        s, f = self.state, self.flags
        out = self.steps.run(batches, n_micro, window_samples, self.timer, s.train_time_s,
                             f.requested and self.checkpointer is not None)
        f.nonfinite, f.over_budget, f.preempted = out.nonfinite, out.over_budget, out.preempted
        # Divergence is decided on the reduced global loss, which every rank holds bit for bit.
        s.diverged = s.diverged or (not out.nonfinite and out.loss > self.cfg.train.max_loss)
        return out.loss, out.grad_norm, out.applied

    # ---- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's metrics over the whole evaluation set (global, the same on every rank)."""
        self.model.eval()
        metrics = self.task.evaluate(self.model, self.eval_loader, self.engine)
        self.model.train()
        return metrics

    def _evaluate_and_decide(self) -> bool:
        """Evaluate, record, check the target, and let the policies act on the metrics.
        Returns whether the micro size changed (see ``_ask_policies``)."""
        s = self.state
        t0 = time.perf_counter()
        s.metrics = self.evaluate()
        self.timer.eval_s += time.perf_counter() - t0
        s.last_eval_mark = s.samples
        epoch = self._epoch_progress()
        self.logger.log({"kind": "eval", "step": s.step, "epoch": epoch, "samples": s.samples,
                         **s.metrics, "time_s": s.train_time_s})
        metrics = {**s.metrics, "train_loss": s.last_loss}  # (the task's, and the loop's own)
        target, value = self.cfg.train.target_acc, metrics[self.target.name]
        if target > 0 and not self.target.better(target, value):
            s.target_reached(epoch)
        # (deciding on the metrics belongs to the evaluation's time, not to training's)
        return self._ask_policies("after_eval", self.plan.position(s.consumed), timed=False,
                                  metrics=metrics)

    # ---- plan changes -----------------------------------------------------------------------
    def _view(self, **facts: Any) -> PolicyView:
        """What the policies see now (``facts``: the hook's own, e.g. the position)."""
        s, e = self.state, self.engine
        reduce_mean = (lambda v: e.reduce_scalars(v, op="mean")) if e.world_size > 1 else \
            (lambda v: v)
        return PolicyView(plan=self.plan, step=s.step, samples=s.samples,
                          sample=self.steps.last_sample, reduce_mean=reduce_mean,
                          log=self.logger.log, **facts)

    def _ask_policies(self, hook: str, position: int, timed: bool = True,
                      **facts: Any) -> bool:
        """Ask every policy at ``hook``; apply their changes. Returns whether the micro size
        changed (the rest of the epoch is then cut again from ``position``). ``timed``: the
        time spent deciding is training time."""
        if not self.policies.policies:
            return False
        t0, micro = time.perf_counter(), self.plan.micro_size
        for policy in self.policies.policies:
            for change in getattr(policy, hook)(self._view(position=position, **facts)):
                self._apply(change)
        if timed:
            self.state.train_time_s += time.perf_counter() - t0
        return self.plan.micro_size != micro

    def _apply(self, change: PlanChange) -> None:
        """The one place a plan change takes effect: the plan, the schedule's peak LR (the
        plan's rule gives it; plateau growth keeps it), an LR cut, the loader's micro size;
        then the ``plan_change`` record."""
        s = self.state
        if change.plan is not None:
            if change.plan.micro_size != self.plan.micro_size:
                self.train_loader.set_batch_size(change.plan.micro_size)
            self.plan = change.plan
            self.schedule.set_peak_lr(self.plan.peak_lr)
        if change.reduce_lr:
            self.schedule.reduce_lr()
        p = self.plan
        record = {"kind": "plan_change", "step": s.step, "samples": s.samples,
                  "time_s": s.train_time_s, "action": change.action, **change.record,
                  "global_size": p.global_size, "micro_size": p.micro_size,
                  "accum_steps": p.accum_steps, "lr": self.schedule.lr}
        s.plan_changes.append(record)
        self.logger.log(record)
        if change.announce and self.engine.is_main:
            print(change.announce, flush=True)

    # ---- the loop ---------------------------------------------------------------------------
    def _epoch_progress(self) -> float:
        return self.state.epoch + self.plan.epoch_fraction(self.state.consumed)

    def _should_stop(self) -> str:
        t, s, f = self.cfg.train, self.state, self.flags
        if s.diverged:
            return "diverged"
        if f.preempted:
            return "preempted"
        if t.stop_at_target and s.reached_target:
            return "target_reached"
        if t.max_steps and s.step >= t.max_steps:
            return "max_steps"
        if f.over_budget:
            return "time_budget"
        if self._epoch_progress() >= t.epochs - 1e-9:
            return "epochs"
        return ""

    def _eval_due(self) -> bool:
        every = self.cfg.train.eval_every_samples
        if every:
            return self.state.samples // every > self.state.last_eval_mark // every
        return self.state.consumed == self.plan.micro_batches_per_epoch  # epoch end

    def _on_dropped_step(self, loss: float) -> bool:
        """A window whose update was not applied: counted (skip, fp16 overflow) or the run
        stops at the last good step, which gets a set, as diverged (stop). Returns True to
        stop."""
        s = self.state
        if not self.flags.nonfinite or self.cfg.train.nonfinite == "skip":
            s.skipped_steps += 1
            self.logger.log({"kind": "skip", "step": s.step, "samples": s.samples,
                             "loss": loss, "skipped_steps": s.skipped_steps,
                             "reason": "nonfinite" if self.flags.nonfinite else "fp16_overflow"})
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

    def _maybe_checkpoint(self) -> None:
        """A set every checkpoint.every_steps and at the last step, whatever ended the run
        (pre-emption included), before the closing evaluation (as a longer run has it)."""
        every, s = self.cfg.checkpoint.every_steps, self.state
        if self.checkpointer is None or self.checkpointer.has_set(s.step):
            return  # this step's set exists (a stop right after a periodic set)
        if s.stop_reason or (every and s.step % every == 0):
            self.checkpointer.save(s.step, self._set_facts())

    def _set_facts(self) -> dict[str, Any]:
        """What a checkpoint set says about itself beyond its parts (its manifest)."""
        s = self.state
        return {"epoch": s.epoch, "consumed": s.consumed, "plan": self.plan.to_json()}

    def _epoch_batches(self) -> Iterator[Batch]:
        """This epoch's micro-batches from the current position (a fresh epoch's order minus
        what was consumed: a resume, or a re-cut in another micro size)."""
        batches = iter(self.train_loader)
        for _ in range(self.state.consumed):
            next(batches)
        return batches

    def _run_epoch(self) -> None:
        s = self.state
        if s.consumed == 0 and s.step:
            self._ask_policies("at_epoch_start", 0, epoch_start=True)
        self.train_loader.set_epoch(s.epoch)
        batches = self._epoch_batches()
        position = self.plan.position(s.consumed)
        self.timer = Timer()
        epoch_start = time.perf_counter()
        while s.consumed < self.plan.micro_batches_per_epoch and not s.stop_reason:
            n_micro, window = self.plan.window(s.consumed, position,
                                               self.policies.max_window(self.plan, position))
            lr = self.schedule.lr  # the LR this step uses (the schedule moves on inside)
            t0 = time.perf_counter()
            loss, grad_norm, applied = self.train_step(batches, n_micro, window)
            seconds = time.perf_counter() - t0
            s.train_time_s += seconds
            s.consumed += n_micro  # a dropped window's data is consumed all the same
            position += window
            if not applied and self._on_dropped_step(loss):
                break
            if applied:
                s.step += 1
                s.samples += self.plan.global_samples(window)
                s.last_loss, s.last_grad_norm = loss, grad_norm
            if applied and (s.step % self.cfg.log.every_steps == 0 or s.diverged):
                self.logger.log({"kind": "train", "step": s.step,
                                 "epoch": self._epoch_progress(), "samples": s.samples,
                                 "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                 "time_s": s.train_time_s, "skipped_steps": s.skipped_steps,
                                 **self.noise.metrics})
            recut = self._eval_due() and not s.diverged and self._evaluate_and_decide()
            # After every applied step the policies learn; inside the epoch they may change the
            # plan (at its end the next epoch's start decides).
            if applied and self._ask_policies(
                    "after_step", position, step_seconds=seconds, micro_batches=n_micro,
                    noise_raw=self.noise.raw,
                    epoch_end=s.consumed >= self.plan.micro_batches_per_epoch):
                recut = True
            if recut and position < self.plan.shard_size:  # the rest in the new micro size
                s.consumed = self.plan.consumed_at(position)
                batches = self._epoch_batches()
            s.stop_reason = self._should_stop()
            self._maybe_checkpoint()
        # Evaluation is excluded from the epoch's training time, as from time-to-target.
        wall = time.perf_counter() - epoch_start
        self.logger.log({"kind": "epoch", "epoch": s.epoch, "step": s.step,
                         "epoch_time_s": wall - self.timer.eval_s,
                         "data_time_s": self.timer.data_s, "compute_time_s": self.timer.compute_s,
                         "eval_time_s": self.timer.eval_s, "micro_batches": s.consumed})
        if s.consumed == self.plan.micro_batches_per_epoch:
            s.epoch += 1
            s.consumed = 0

    def fit(self) -> dict[str, Any]:
        """Train until epochs, max_steps, the time budget, divergence or the target."""
        wall_start = time.perf_counter()
        finished = self._finished_before_start()
        if finished is not None:
            return finished
        t, s = self.cfg.train, self.state
        self.logger.begin(s.step, self.plan.planned_steps(t.epochs, t.max_steps), s.train_time_s)
        self.model.train()
        while not self.state.stop_reason:
            self._run_epoch()
        over = self.state.stop_reason in ("preempted", "nonfinite") or self.state.diverged
        if self.state.last_eval_mark != self.state.samples and not over:
            self._evaluate_and_decide()
        summary = self.summary(time.perf_counter() - wall_start)
        if self.checkpointer is not None and self.state.stop_reason != "preempted":
            self.checkpointer.mark_done(self.state.step, self._set_facts(), summary)
        self.done = True
        return summary

    def _finished_before_start(self) -> Optional[dict[str, Any]]:
        """The stored summary when a requeued run's stop condition already holds (no step)."""
        t, s = self.cfg.train, self.state
        self.flags.over_budget = bool(t.time_budget_s) and s.train_time_s >= t.time_budget_s
        s.stop_reason = self._should_stop()
        finished = None if self.checkpointer is None else self.checkpointer.finished(s.stop_reason)
        self.done = finished is not None
        return finished

    def summary(self, wall_s: float) -> dict[str, Any]:
        """The run's outcome (summary.json)."""
        return {"epochs_run": self._epoch_progress(), "wall_s": wall_s,
                **{f"final_{m.name}": math.nan for m in self.task.metrics},
                **self.state.outcome(), "final_lr": self.schedule.lr, **self.noise.summary(),
                "plan": self.initial_plan.to_json()}

    # ---- what tools and signals may ask of a run ---------------------------------------------
    def request_stop(self) -> bool:
        """A signal's request: finish the step, checkpoint, stop (agreed by every rank in the
        next step). Returns False once training is over (the caller handles the signal)."""
        if self.done:
            return False
        self.flags.requested = True
        return True

    def full_windows(self) -> Iterator[tuple[Iterator[Batch], int, int]]:
        """``train_step``'s arguments for full planned windows from this epoch on (an epoch's
        short last window skipped)."""
        plan, epoch = self.plan, self.state.epoch
        while plan.full_windows_per_epoch:  # (none: the epoch is smaller than one batch)
            self.train_loader.set_epoch(epoch)
            batches = iter(self.train_loader)
            for _ in range(plan.full_windows_per_epoch):
                yield batches, plan.accum_steps, plan.window_size
            epoch += 1

    def use_lr_plan(self, initial: BatchPlan, current: BatchPlan, start_factor: float) -> None:
        """``optim.lr=auto``'s outcome: the first plan and the plan in force with its LR."""
        self.initial_plan, self.plan = initial, current
        self.schedule.retarget(current.peak_lr, current.warmup_steps, start_factor)

    def snapshot(self) -> RunSnapshot:
        """An exact copy of what training changes (a collective at ZeRO 3)."""
        e = self.engine
        return copy.deepcopy(RunSnapshot(
            trainer=self.state_dict(), engine=(e.state_dict(), e.rank_state_dict()),
            schedule=self.schedule.state_dict(), noise=self.noise.state_dict(),
            policies=self.policies.state_dict(), flags=self.flags, timer=self.timer,
            plan=self.plan, loader_epoch=getattr(self.train_loader, "epoch", None),
            training=self.model.training, rng=rng_state()))

    def restore(self, snap: RunSnapshot) -> None:
        """Put back what ``snapshot`` captured; the LR is the schedule's again."""
        snap = copy.deepcopy(snap)
        self.engine.load_state_dict(*snap.engine)
        self.schedule.load_state_dict(snap.schedule)  # re-applies the schedule's LR
        self.noise.load_state_dict(snap.noise)
        self.policies.load_state_dict(snap.policies)
        self.state.load_state_dict(snap.trainer["run"], keep_stop_reason=True)
        self.plan, self.flags, self.timer = snap.plan, snap.flags, snap.timer
        if snap.loader_epoch is not None:
            self.train_loader.set_epoch(snap.loader_epoch)
        self.model.train(snap.training)
        set_rng_state(snap.rng)

    # ---- the trainer's own part of a checkpoint ---------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # the loop's counters and the plan in force
        return {"run": self.state.state_dict(), "plan": self.plan.to_json()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict``: the same step, data position and batch plan."""
        self.state.load_state_dict(state["run"])
        self._continue_with(BatchPlan.from_json(state["plan"]))

    def load_resharded(self, state: dict[str, Any], old_world: int) -> None:
        """Continue a set written at another world size: the plan for this world (the config's,
        or the grown batch cut for it) and the epoch position mapped by samples."""
        self.state.load_state_dict(state["run"])
        plan, self.state.consumed, note = self.plan.continue_from(
            BatchPlan.from_json(state["plan"]), self.state.consumed)
        if note and self.engine.is_main:
            print(note, flush=True)
        self._continue_with(plan)

    def _continue_with(self, plan: BatchPlan) -> None:
        if plan.micro_size != self.plan.micro_size:
            self.train_loader.set_batch_size(plan.micro_size)  # adapted before the save
        self.plan = plan
        self.logger.drop_after(self.state.step)  # what a killed run logged past this set
