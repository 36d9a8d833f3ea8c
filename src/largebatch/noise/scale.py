"""The gradient noise scale B_simple = tr(Σ) / |G|², measured live during training.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training", appendix A.1): the squared
norm of a gradient averaged over B samples has expectation E|G_B|² = |G|² + tr(Σ)/B. Two batch
sizes measured at the same step give unbiased estimates of both terms:

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Each is smoothed by its own bias-corrected EMA (``EMA_DECAY``), and the noise scale is the ratio
of the two EMAs (the ratio of noisy per-step estimates would be biased). ``critical_batch`` is
the same figure: B_crit ≈ B_simple in the paper's model.

Where the two batches come from (no extra backward pass, no extra collective):

* Several ranks (DDP): the small batch is one rank's window (micro x accum). A communication
  hook squares each gradient bucket before it is all-reduced (under ``no_sync`` the hook runs
  once, at the boundary, on the rank's accumulated window gradient); the trainer averages these
  over ranks inside the step's one small collective. The big batch is the global one: the
  all-reduced gradient every rank holds after the sync.
* One process: the small batches are the window's micro-batches, each one's own gradient read
  from the difference of ``.grad`` around its backward; the big batch is the window. A window
  of one micro-batch has no small batch: nothing is estimated.
* DeepSpeed reduces gradients inside its own engine, before largebatch sees them: unavailable.

A window whose batches differ in size (an epoch's short last one) is exact too: with the
trainer's convention (the accumulated gradient is the sample mean of the window), the mean of
the small batches' squared norms has expectation |G|² + tr(Σ)·mean(1/B_i), so B_small is the
harmonic mean of the small batches and B_big follows from it (see ``NoiseScaleMonitor.update``).

Only the replicated parameters are measured (the engine's ``parameters()`` and the DDP-wrapped
module): a task's sharded modules (the face task's Partial FC head) are left out. fp16 gradients
are unscaled by the grad scaler's scale first; steps that are not applied (non-finite, fp16
overflow) are skipped. A task whose loss carries a constant factor c on the window mean scales
``grad_sq_norm`` and ``grad_trace_cov`` by c² alike; their ratio, the noise scale, is unchanged.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from largebatch.engines.base import GradientProbe

#: Decay of both EMAs: a memory of about 1 / (1 - 0.95) = 20 steps, enough to average the
#: per-step estimates (each is very noisy) while following a noise scale that drifts in training.
EMA_DECAY = 0.95

#: The metric names, in train records of metrics.jsonl (and ``final_<name>`` in summary.json).
METRICS = ("noise_scale", "grad_sq_norm", "grad_trace_cov", "critical_batch")


@dataclass
class BiasCorrectedEMA:
    """Exponential moving average whose start-up bias toward 0 is divided out (as in Adam)."""

    decay: float = EMA_DECAY
    value: float = 0.0
    count: int = 0

    def update(self, x: float) -> float:
        """Add one observation; returns the corrected mean."""
        self.value = self.decay * self.value + (1.0 - self.decay) * x
        self.count += 1
        return self.mean

    @property
    def mean(self) -> float:
        """The bias-corrected average (NaN before any observation)."""
        if self.count == 0:
            return math.nan
        return self.value / (1.0 - self.decay ** self.count)


def two_batch_estimates(b_small: float, b_big: float, sq_small: float,
                        sq_big: float) -> tuple[float, float]:
    """Unbiased per-step estimates of |G|² and tr(Σ) from two batch sizes (McCandlish A.1).

    Args:
        b_small: samples behind ``sq_small`` (must be < ``b_big``).
        b_big: samples behind ``sq_big``.
        sq_small: squared norm of the small-batch gradient (averaged over small batches).
        sq_big: squared norm of the big-batch gradient.

    Returns:
        ``(|G|², tr(Σ))``; either may be negative on a single noisy step.
    """
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    trace = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


class NoiseScaleEstimator:
    """The two EMAs and their ratio.

    Args:
        decay: EMA decay of both running estimates.
    """

    def __init__(self, decay: float = EMA_DECAY) -> None:
        self.g2 = BiasCorrectedEMA(decay)
        self.trace = BiasCorrectedEMA(decay)
        self.last_raw: Optional[tuple[float, float]] = None

    def update(self, b_small: float, b_big: float, sq_small: float,
               sq_big: float) -> dict[str, Optional[float]]:
        """Add one step's measurement; returns the metrics (see ``METRICS``).

        The noise scale is None while the |G|² average is not positive (early, very noisy).
        """
        g2, trace = two_batch_estimates(b_small, b_big, sq_small, sq_big)
        self.last_raw = (g2, trace)  # this step's own (unsmoothed) estimates
        g2, trace = self.g2.update(g2), self.trace.update(trace)
        ratio = trace / g2 if g2 > 0 else None
        return {"noise_scale": ratio, "grad_sq_norm": g2, "grad_trace_cov": trace,
                "critical_batch": ratio}

    def state_dict(self) -> dict[str, Any]:
        """Both EMAs (for an exact resume)."""
        return {"g2": [self.g2.value, self.g2.count], "trace": [self.trace.value,
                                                                 self.trace.count]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``."""
        self.g2.value, self.g2.count = state["g2"]
        self.trace.value, self.trace.count = state["trace"]


def grad_sq_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """Squared 2-norm of all present gradients together (float64, on their device)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([n.double() for n in torch._foreach_norm(grads, 2.0)]).square().sum()


class MicroGradProbe:
    """One process: each micro-batch's own gradient, from ``.grad`` around its backward.

    Keeps a copy of the accumulated gradients before each backward (one model's gradients of
    memory); the difference after it is the micro-batch's share of the window gradient.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self._prev: list[Optional[torch.Tensor]] = []
        self._sq: list[torch.Tensor] = []  # |g_i|² of each micro-batch (device tensors)
        self._inv: list[float] = []  # 1 / n_i

    @contextlib.contextmanager
    def micro(self, n: int, window: int) -> Iterator[None]:
        """Around one micro-batch of ``n`` of the window's ``window`` samples."""
        self._prev = [None if p.grad is None else p.grad.detach().clone() for p in self.params]
        yield
        diffs = [p.grad.detach() if prev is None else p.grad.detach() - prev
                 for p, prev in zip(self.params, self._prev) if p.grad is not None]
        self._prev = []
        if not diffs:
            return
        share = n / window  # the trainer's convention: the window gradient is its sample mean
        sq = torch.stack([d.double() for d in torch._foreach_norm(diffs, 2.0)]).square().sum()
        self._sq.append(sq / share ** 2)
        self._inv.append(1.0 / n)

    def pop(self) -> tuple[float, float]:
        """``(mean |g_i|², mean 1/n_i)`` over the window's micro-batches; ``(0, 0)`` when it had
        fewer than two (no small batch)."""
        sq, inv = self._sq, self._inv
        self._sq, self._inv = [], []
        if len(sq) < 2:
            return 0.0, 0.0
        return float(torch.stack(sq).mean()), sum(inv) / len(inv)


class NoiseScaleMonitor:
    """What the trainer talks to: probes, the collective's share, the EMAs, the metrics.

    Off (``enabled=False``) every method is a no-op and nothing is added to the collective.

    Args:
        engine: the run's engine (asked how it can see gradients before their reduction).
        enabled: ``train.noise_scale``.
        accum_steps: the plan's accumulation (for the one-line notice on one process).
        engine_label: how the notices name the engine (e.g. 'deepspeed (ZeRO stage 2)').
        decay: EMA decay.
        say: where the one-line notices go (rank 0 only).
    """

    def __init__(self, engine: Any, enabled: bool, accum_steps: int = 1,
                 engine_label: str = "", decay: float = EMA_DECAY,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.engine = engine
        # Only an engine that can show a rank's gradient before its reduction can measure it.
        probe = enabled and isinstance(engine, GradientProbe)
        self.kind = engine.start_grad_probe() if probe else ""
        self.enabled = enabled
        self.estimator = NoiseScaleEstimator(decay)
        self.metrics: dict[str, Optional[float]] = {}
        #: the last applied step's own (|G|², tr(Σ)) estimates; None when it gave none
        self.raw: Optional[tuple[float, float]] = None
        self._micro = MicroGradProbe(engine.parameters()) if self.kind == "micro" else None
        self._null = contextlib.nullcontext()
        if not enabled or not engine.is_main:
            return
        if not self.kind:
            say(f"largebatch: train.noise_scale is unavailable with engine "
                f"{engine_label or engine.name}: it reduces the gradients before largebatch "
                f"can measure them; no noise scale is logged")
        elif self.kind == "micro" and accum_steps == 1:
            say("largebatch: train.noise_scale needs gradient accumulation on one process "
                "(batch.accum_steps=1: a window of one micro-batch has no smaller batch); "
                "nothing is logged (`largebatch noise-scale` splits the window itself)")

    def micro(self, n: int, window: int) -> contextlib.AbstractContextManager:
        """Context around one micro-batch's forward/backward (measures it on one process)."""
        return self._micro.micro(n, window) if self._micro is not None else self._null

    def local_values(self, window_samples: int) -> list[float]:
        """This rank's ``[|G_small|², 1/B_small]`` for the step's collective (summed over
        ranks); ``[]`` when off or unavailable. Called once per window, after its backward,
        with this rank's samples in the window (B_small under DDP)."""
        if not self.kind:
            return []
        scale2 = self.engine.loss_scale() ** 2
        if self._micro is not None:
            sq, inv = self._micro.pop()
            return [sq / scale2, inv]
        local = self.engine.pop_local_grad_sq_norm()
        return [0.0, 0.0] if local is None else [float(local) / scale2,
                                                 1.0 / window_samples]

    def global_sq_norm(self) -> Optional[float]:
        """|G_big|²: the (reduced, unscaled) window gradient's squared norm; call before the
        optimizer step. None when off."""
        if not self.kind:
            return None
        return float(grad_sq_norm(self.engine.parameters())) / self.engine.loss_scale() ** 2

    def update(self, reduced: list[float], world_size: int, window_samples: int,
               sq_big: Optional[float]) -> None:
        """Add the step: ``reduced`` = ``local_values`` summed over ranks. Call only for an
        applied step; a step without a small batch or with a non-finite figure is skipped."""
        self.raw = None
        if not self.kind or sq_big is None or not reduced:
            return
        mean_sq, mean_inv = reduced[0] / world_size, reduced[1] / world_size
        if mean_inv <= 0 or not all(math.isfinite(v) for v in (mean_sq, mean_inv, sq_big)):
            return
        b_small = 1.0 / mean_inv
        # DDP: the global gradient is the mean of the ranks' window means, whose noise is
        # tr(Σ)·mean(1/B_r)/W, i.e. B_big = W·B_small. One process: the window's sample mean.
        b_big = world_size * b_small if self.kind == "comm_hook" else float(window_samples)
        if b_big <= b_small * (1 + 1e-9):
            return
        self.metrics = self.estimator.update(b_small, b_big, mean_sq, sq_big)
        self.raw = self.estimator.last_raw

    def summary(self) -> dict[str, Optional[float]]:
        """``final_<metric>`` for summary.json (empty when off)."""
        if not self.enabled:
            return {}
        return {f"final_{k}": self.metrics.get(k) for k in METRICS}

    def state_dict(self) -> dict[str, Any]:
        """The EMAs, the last metrics and the last step's own estimates ({} when off)."""
        if not self.enabled:
            return {}
        return {**self.estimator.state_dict(), "metrics": dict(self.metrics),
                "raw": None if self.raw is None else list(self.raw)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore ``state_dict`` (None or {}: a set written without the estimate: afresh)."""
        if not state:
            return
        self.estimator.load_state_dict(state)
        self.metrics = dict(state.get("metrics", {}))
        raw = state.get("raw")
        self.raw = None if raw is None else (float(raw[0]), float(raw[1]))
