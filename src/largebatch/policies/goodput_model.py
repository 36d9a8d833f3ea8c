"""The goodput model behind ``batch.adapt: goodput`` (the decisions; ``policies.goodput`` hooks
them into a run): the global batch that maximises goodput, chosen during training.

Goodput (Pollux, Qiao et al., OSDI 2021) is the training progress per second:

    goodput(M) = throughput(M) x efficiency(M)

* **Efficiency** from the live noise scale B (``largebatch.noise.scale``, B_simple) and the
  empirical model of McCandlish et al. 2018: reaching a loss takes E(M) = E_min (1 + M / B)
  samples at batch M, so a sample at batch M is worth E(M0) / E(M) = (B + M0) / (B + M) of a
  sample at the initial batch M0 (the LR following ``optim.scale_rule``). B is read from the
  trainer's per-step two-batch estimates as sum tr(Σ) / sum |G|² since the last decision (the
  earlier intervals carried at half weight, ``noise_scale``): on one process at a large micro
  size the two batches are only 2x apart and a single step's tr(Σ) is mostly noise.
* **Throughput** = M / T(m, a), with the optimizer step's time for micro size m and
  accumulation a modelled as ``T = c * a * tau(m) + gamma``: ``tau(m)`` is one forward +
  backward, timed once at every candidate micro size (the first decision; weights, gradients,
  optimizer state and RNG are restored afterwards, so training is unchanged). Measured, not
  fitted: on a CPU the time per sample is not monotone in m (caches; seed_cnn on 2 cores:
  0.23 ms at 30, 0.12 ms at 240, 0.18 ms at 960), so a line through them would mislead;
  ``c`` and ``gamma`` (what a step costs beyond its micro-batches: the update, the all-reduce's
  tail) are fitted to this run's own step times by least squares over the recent steps. With
  one accumulation seen so far, ``gamma`` is taken as 0 (no gain from accumulation is claimed).

Candidates are ``M = m x a x world`` with m the configured micro size, or (``batch.
adapt_max_micro``) sizes from it up to that limit in powers of two and the limit itself, and
``a >= 1`` (``>= 2`` on one process, where the window's micro-batches are the noise scale's
small batches), up to ``batch.max_global_size`` (default: the training set). The accumulation
may change at any decision; a micro size only where the rank's position in the epoch is a
whole number of its micro-batches (always at an epoch start): the loader re-cuts the rest of
the epoch from that sample on, so no sample is skipped or repeated and a resume finds the
same position. A change needs a predicted gain of ``MIN_GAIN``: noise in the
step times must not make the batch flap. Every rank decides alike: the model's inputs are
averaged over ranks (one small collective per decision, not per step).

Why it is written here: AdaptDL (Pollux's code) needs its own trainer, scheduler and data
loader, has no DeepSpeed path and is unmaintained; the model above is a page of code, and it
reads the noise scale the trainer already measures.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from largebatch.plan import BatchPlan

#: The smallest predicted goodput gain that changes the batch (hysteresis against noise).
MIN_GAIN = 0.05
#: Per-step noise-scale estimates (weighted count) a decision needs.
MIN_ESTIMATES = 10
#: Recent step times the throughput fit uses.
WINDOW = 64
#: Weight of the earlier intervals' noise-scale sums at each decision (the last one counts 1).
CARRY = 0.5


def efficiency(batch: float, noise_scale: float, initial_batch: float) -> float:
    """Progress per sample at ``batch`` relative to ``initial_batch`` (McCandlish et al.)."""
    return (noise_scale + initial_batch) / (noise_scale + batch)


def micro_sizes(micro: int, max_micro: Optional[int]) -> list[int]:
    """``micro``, its doublings below ``max_micro``, and ``max_micro`` itself."""
    if max_micro is None or max_micro <= micro:
        return [micro]
    out, m = [], micro
    while m < max_micro:
        out.append(m)
        m *= 2
    return out + [max_micro]


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; with one distinct x: ``(0, mean y / mean x)``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 1e-12 * max(1.0, mx * mx):
        return 0.0, my / mx
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


def time_forward_backward(model: nn.Module, loss_fn: Callable, x: torch.Tensor,
                          y: torch.Tensor, sizes: Sequence[int], autocast: Callable,
                          repeats: int = 4) -> list[float]:
    """Seconds of one forward + backward at each micro size (the fastest of ``repeats`` after
    one warm-up), on the real samples ``x, y`` tiled to size. Leaves gradients behind: call it
    inside ``largebatch.tune.exact_state.preserved``."""
    out = []
    for m in sizes:
        idx = torch.arange(m, device=x.device) % len(x)
        xm, ym = x[idx], y[idx]
        best = math.inf
        for rep in range(repeats + 1):
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast():
                loss = loss_fn(model, xm, ym)
            loss.backward()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            if rep:  # the first pass warms allocator and kernels up
                best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out


class GoodputAdapter:
    """Decides the batch; holds the throughput model (``state_dict`` for an exact resume).

    Args:
        plan: the run's initial plan (M0, the micro size, world, dataset, limits).
        every_steps: optimizer steps between decisions.
        max_micro: ``batch.adapt_max_micro`` (None: the micro size stays).
        can_change_micro: whether the loader can re-cut its micro-batches.
    """

    active = True

    def __init__(self, plan: BatchPlan, every_steps: int, max_micro: Optional[int],
                 can_change_micro: bool) -> None:
        self.initial_batch = plan.global_size
        self.every_steps = every_steps
        self.micros = micro_sizes(plan.micro_size, max_micro if can_change_micro else None)
        self.max_global = plan.max_global_size or plan.dataset_size
        self.min_accum = 2 if plan.world_size == 1 else 1
        self.profile: dict[int, float] = {}  # micro size -> seconds of forward + backward
        self.steps: list[tuple[int, int, float]] = []  # (micro, accum, seconds), recent
        self.last_decision_step = 0
        self.decisions = 0
        #: a chosen micro size waiting for a position it divides: (micro, accum)
        self.pending: Optional[tuple[int, int]] = None
        self.sums = [0.0, 0.0, 0.0]  # |G|² and tr(Σ) per-step estimates, their (weighted) count
        #: what the last judged decision weighed (an ``adapt_decision`` record; not state)
        self.last_judgement: Optional[dict[str, Any]] = None

    # ---- what the trainer feeds in -------------------------------------------------------
    def observe(self, micro: int, n_micro: int, seconds: float,
                raw: Optional[tuple[float, float]] = None) -> None:
        """One applied optimizer step of ``n_micro`` micro-batches of ``micro`` samples, and
        its own noise-scale estimates ``raw = (|G|², tr(Σ))`` (None: it gave none)."""
        self.steps.append((micro, n_micro, float(seconds)))
        del self.steps[:-WINDOW]
        if raw is not None and all(math.isfinite(v) for v in raw):
            self.sums[0] += raw[0]
            self.sums[1] += raw[1]
            self.sums[2] += 1.0

    def noise_scale(self) -> Optional[float]:
        """B_simple for a decision: the sum of the per-step tr(Σ) estimates over the sum of the
        |G|² ones since the last decision, the earlier intervals' sums carried with weight
        ``CARRY`` (a ratio of sums: the per-step ratios are far too noisy; the monitor's EMA
        remembers ~20 steps, this the interval and some of the ones before). None while there
        are fewer than ``MIN_ESTIMATES`` or the |G|² sum is not positive."""
        g2, trace, n = self.sums
        if n < MIN_ESTIMATES or g2 <= 0 or trace <= 0:
            return None
        return trace / g2

    def due(self, step: int) -> bool:
        """Whether a decision is due after ``step`` optimizer steps (same on every rank)."""
        return step - self.last_decision_step >= self.every_steps

    # ---- the model ------------------------------------------------------------------------
    def tau_of(self, m: int) -> float:
        """Seconds of one forward + backward at micro size ``m``: the profile's, or (a size it
        does not hold) the nearest profiled size's time per sample times ``m``."""
        if m in self.profile:
            return self.profile[m]
        near = min(self.profile, key=lambda k: abs(k - m))
        return self.profile[near] * m / near

    def step_model(self) -> tuple[float, float]:
        """``(c, gamma)`` of ``T = c * a * tau(m) + gamma`` from the recent steps."""
        xs = [a * self.tau_of(m) for m, a, _ in self.steps]
        ys = [t for _, _, t in self.steps]
        gamma, c = fit_line(xs, ys)
        if c <= 0 or gamma < 0:  # noise made the fit unphysical: no per-step overhead
            gamma, c = 0.0, sum(ys) / sum(xs)
        return c, gamma

    def goodput(self, plan: BatchPlan, micro: int, accum: int, noise_scale: float, c: float,
                gamma: float) -> float:
        """Samples per second at (micro, accum) on ``plan``'s world, weighted by their
        efficiency."""
        batch = plan.global_of(micro, accum)
        seconds = c * accum * self.tau_of(micro) + gamma
        return batch / seconds * efficiency(batch, noise_scale, self.initial_batch)

    def best(self, plan: BatchPlan, noise_scale: float, c: float, gamma: float,
             micros: Sequence[int]) -> tuple[int, int, float]:
        """The candidate with the highest goodput: ``(micro, accum, goodput)``."""
        top = (plan.micro_size, plan.accum_steps,
               self.goodput(plan, plan.micro_size, plan.accum_steps, noise_scale, c, gamma))
        for m in micros:
            most = max(self.min_accum, plan.max_accum(m, self.max_global))
            for a in range(self.min_accum, most + 1):
                if plan.global_of(m, a) > self.max_global:
                    break
                g = self.goodput(plan, m, a, noise_scale, c, gamma)
                if g > top[2]:
                    top = (m, a, g)
        return top

    # ---- a decision -------------------------------------------------------------------------
    def decide(self, plan: BatchPlan, step: int, position: int,
               reduce_mean: Callable[[list[float]], list[float]],
               profile: Callable[[list[int]], list[float]]) -> Optional[dict[str, Any]]:
        """Choose the batch after ``step`` steps; None when it stays (or cannot be judged yet).

        Every rank must call it at the same step (a collective). ``position`` is this rank's
        samples into the epoch: the epoch goes on in whole micro-batches, so a micro size that
        does not divide it is not taken now; its global batch is, through the current micro
        size, and the micro size follows (``pending``) after the next step, shortened if need
        be (``max_window``) to end where the new size divides the position.
        ``profile(sizes)`` times a forward + backward at each size (the first decision only).

        Returns:
            ``{"micro_size", "accum_steps", "noise_scale", "gain", "c", "gamma"}``: what to
            run from the next step on.
        """
        self.last_decision_step = step
        noise_scale = self.noise_scale()
        if noise_scale is None or not self.steps:
            return None
        self.sums = [CARRY * v for v in self.sums]
        if not self.profile:  # one profile per run (kept in the checkpoint)
            seconds = reduce_mean(profile(self.micros))
            self.profile = {m: max(float(t), 1e-9) for m, t in zip(self.micros, seconds)}
        c, gamma = self.step_model()
        noise, c, gamma = reduce_mean([float(noise_scale), c, gamma])  # every rank alike
        micro, accum, best = self.best(plan, noise, c, gamma, self.micros)
        # A micro size the epoch can go on in neither now nor after aligning: not a candidate.
        if not plan.aligned(position, micro) and not plan.aligned(micro, plan.micro_size):
            micro, accum, best = self.best(plan, noise, c, gamma,
                                           [m for m in self.micros if plan.aligned(position, m)])
        now = self.goodput(plan, plan.micro_size, plan.accum_steps, noise, c, gamma)
        self.pending = None
        stays = (micro, accum) == (plan.micro_size, plan.accum_steps) or \
            best < now * (1 + MIN_GAIN)
        self.last_judgement = {"step": step, "noise_scale": noise, "c": c, "gamma": gamma,
                               "best_micro": micro, "best_accum": accum,
                               "best_global": plan.global_of(micro, accum),
                               "predicted_gain": best / now, "changes": not stays}
        if stays:
            return None
        if not plan.aligned(position, micro):  # the global batch now, the micro size later
            self.pending = (micro, accum)
            micro, accum = plan.micro_size, plan.accum_for(plan.global_of(micro, accum),
                                                           plan.micro_size)
        self.decisions += 1
        if (micro, accum) == (plan.micro_size, plan.accum_steps):
            return None  # only the micro size changes, later
        return {"micro_size": micro, "accum_steps": accum, "noise_scale": noise,
                "gain": best / now, "c": c, "gamma": gamma}

    def max_window(self, plan: BatchPlan, position: int) -> Optional[int]:
        """At most this many micro-batches in the next window, so that it ends where the
        pending micro size divides the position (one short step, like an epoch's last);
        None without a pending micro size."""
        if self.pending is None:
            return None
        return plan.micro_batches_until_aligned(position, self.pending[0])

    def pending_at(self, plan: BatchPlan, position: int) -> Optional[tuple[int, int]]:
        """The pending ``(micro, accum)`` when this rank's ``position`` allows it, else None."""
        if self.pending is not None and plan.aligned(position, self.pending[0]):
            return self.pending
        return None

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The throughput model and the decision clock (plain numbers)."""
        return {"profile": {str(k): v for k, v in self.profile.items()}, "sums": list(self.sums),
                "steps": [list(s) for s in self.steps],
                "last_decision_step": self.last_decision_step, "decisions": self.decisions,
                "pending": None if self.pending is None else list(self.pending)}

    def load_state_dict(self, state: Optional[dict[str, Any]], resharded: bool = False) -> None:
        """Restore ``state_dict`` (None: a set from a run without the adapter; start afresh).
        ``resharded``: the set was saved at another world size. A pending micro size is then
        dropped: it was chosen as (micro, accum) for the old world's ranks and positions, and
        applied here it would change the global batch; the next decision chooses afresh."""
        if state is None:
            return
        self.profile = {int(k): float(v) for k, v in state["profile"].items()}
        self.sums = [float(v) for v in state["sums"]]
        self.steps = [(int(m), int(a), float(t)) for m, a, t in state["steps"]]
        self.last_decision_step = int(state["last_decision_step"])
        self.decisions = int(state["decisions"])
        pending = None if resharded else state.get("pending")
        self.pending = None if pending is None else (int(pending[0]), int(pending[1]))

