"""Advice from a measured gradient noise scale: the empirical model of large-batch training.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") model the optimizer
steps S and the training samples E needed to reach a given loss at global batch B as

    S = S_min (1 + B_noise / B),        E = E_min (1 + B / B_noise),

where B_noise is the gradient noise scale (approximated by B_simple = tr(Sigma) / |G|^2).
Below B_noise, doubling the batch nearly halves the steps (perfect scaling); above it, it
nearly doubles the samples (compute is wasted). At B = B_noise both cost exactly twice their
minimum, and B_noise is where the product (S/S_min)(E/E_min) = 2 + B/B_noise + B_noise/B,
a balance of time against compute, is smallest: that is the critical batch (the paper's
B_crit ~ B_noise).

Everything here is a pure function. The batch arithmetic of a candidate batch (its
accumulation and the LR the configured scaling rule gives it) comes from the batch plan
(``BatchPlan.with_global_size``: same micro size, world and LR rule), and so does the step
between valid batches (``BatchPlan.batch_unit``, micro x world); none is recomputed here.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from largebatch.config import ConfigError
from largebatch.plan import BatchPlan


def steps_ratio(batch: float, b_noise: float) -> float:
    """S / S_min = 1 + B_noise / B: optimizer steps relative to the fewest possible."""
    _check_positive(batch, b_noise)
    return 1.0 + b_noise / batch


def samples_ratio(batch: float, b_noise: float) -> float:
    """E / E_min = 1 + B / B_noise: training samples relative to the fewest possible."""
    _check_positive(batch, b_noise)
    return 1.0 + batch / b_noise


def critical_batch(b_noise: float) -> float:
    """The critical batch of the empirical model: B_crit = B_noise (S = 2 S_min, E = 2 E_min)."""
    _check_positive(1.0, b_noise)
    return float(b_noise)


def _check_positive(batch: float, b_noise: float) -> None:
    """ValueError unless the batch and the noise scale are finite and positive."""
    if not (batch > 0 and math.isfinite(batch)):
        raise ValueError(f"batch {batch} must be finite and > 0")
    if not (b_noise > 0 and math.isfinite(b_noise)):
        raise ValueError(f"noise scale {b_noise} must be finite and > 0")


@dataclass(frozen=True)
class NoiseEstimate:
    """B_simple over a run's window: the median of the per-step estimates and its IQR band."""

    value: float   # median of the per-step estimates
    low: float     # 25th percentile
    high: float    # 75th percentile
    count: int     # per-step estimates used

    def to_json(self) -> dict[str, Any]:
        """The estimate as a JSON object."""
        return dataclasses.asdict(self)


def summarize(values: Iterable[Optional[float | str]]) -> Optional[NoiseEstimate]:
    """Median and interquartile band of the per-step noise-scale estimates of the second half.

    The per-step estimates are ratios of EMAs, hence strongly correlated from step to step: a
    standard error would claim far more precision than the run has. The band is the spread
    of the estimate over the second half (the first half is the EMAs' warm-up and the
    fastest-changing part of training). Non-finite and non-positive values (a step where the
    |G|^2 estimate was <= 0, i.e. noise dominated) are dropped; so are None (as which
    metrics.jsonl writes a non-finite number) and the strings 'nan'/'inf' of older files.

    Returns:
        The estimate, or None when no usable value is left.
    """
    values = list(values)
    tail = values[len(values) // 2:]
    numbers = (float(v) for v in tail if v is not None)  # float('nan') reads the strings
    usable = sorted(v for v in numbers if math.isfinite(v) and v > 0)
    if not usable:
        return None
    if len(usable) == 1:
        return NoiseEstimate(usable[0], usable[0], usable[0], 1)
    q1, q2, q3 = statistics.quantiles(usable, n=4, method="inclusive")
    return NoiseEstimate(q2, q1, q3, len(usable))


def recommended_batch(b_noise: float, plan: BatchPlan) -> int:
    """The valid global batch closest to B_noise: a multiple of micro x world.

    Of the two multiples around B_noise, the one with the smaller |log(B / B_noise)| wins,
    which is the one with the smaller (S/S_min)(E/E_min), since that product depends on
    B/B_noise + B_noise/B only (ties go to the smaller batch). At least one unit; at most
    ``batch.max_global_size`` (when set) and the dataset, both floored to a multiple.
    """
    _check_positive(1.0, b_noise)
    unit = plan.batch_unit
    cap = plan.dataset_size
    if plan.max_global_size is not None:
        cap = min(cap, plan.max_global_size)
    top = max(unit, cap // unit * unit)
    below = max(unit, math.floor(b_noise / unit) * unit)
    above = max(unit, math.ceil(b_noise / unit) * unit)
    best = min((below, above), key=lambda b: (abs(math.log(b / b_noise)), b))
    return min(best, top)


def candidate_batches(b_noise: float, plan: BatchPlan, recommended: int) -> list[int]:
    """The batches the advice table shows: the configured one, the recommended one, and the
    valid batches unit x 2^k (k >= 0, unit = micro x world) from B_noise/4 to 4 B_noise (the
    nearest one when none falls in that range), at most the dataset size."""
    unit = plan.batch_unit
    powers, k = [], 0
    while unit * 2 ** k <= min(4 * b_noise, plan.dataset_size):
        if unit * 2 ** k >= b_noise / 4:
            powers.append(unit * 2 ** k)
        k += 1
    if not powers:
        k_near = max(0, round(math.log2(max(b_noise / unit, 1.0))))
        powers.append(unit * 2 ** k_near)
    return sorted({plan.global_size, recommended, *powers})


def advise(estimate: NoiseEstimate, plan: BatchPlan) -> dict[str, Any]:
    """The whole advice as one JSON-able object.

    Args:
        estimate: the measured B_simple (median and IQR band), used as B_noise.
        plan: the configured run's plan (the micro size and world the advice keeps).

    Returns:
        ``noise_scale`` (the estimate), ``critical_batch``, ``configured`` and
        ``recommended`` (rows), and ``table``: one row per candidate batch with its
        accumulation, LR, S/S_min and E/E_min (each with the range the IQR band gives).
    """
    b = estimate.value
    rec = recommended_batch(b, plan)
    rows = [_row(plan.with_global_size(g), estimate)
            for g in candidate_batches(b, plan, rec)]
    by_batch = {r["global_size"]: r for r in rows}
    return {"noise_scale": estimate.to_json(), "critical_batch": critical_batch(b),
            "configured": by_batch[plan.global_size], "recommended": by_batch[rec],
            "table": rows}


def _row(plan: BatchPlan, est: NoiseEstimate) -> dict[str, Any]:
    """One table row: the plan at that batch and the model's S/S_min, E/E_min with ranges."""
    g = plan.global_size
    # S falls and E rises with B_noise's band the opposite ways: order each range low-high.
    steps = sorted((steps_ratio(g, est.low), steps_ratio(g, est.high)))
    samples = sorted((samples_ratio(g, est.low), samples_ratio(g, est.high)))
    return {"global_size": g, "micro_size": plan.micro_size, "accum_steps": plan.accum_steps,
            "world_size": plan.world_size, "lr": plan.peak_lr,
            "steps_ratio": steps_ratio(g, est.value), "steps_ratio_range": steps,
            "samples_ratio": samples_ratio(g, est.value), "samples_ratio_range": samples}


def render(advice: dict[str, Any], scale_rule: str) -> str:
    """The advice as the lines ``largebatch noise-scale`` prints."""
    n = advice["noise_scale"]
    rec, conf = advice["recommended"], advice["configured"]
    lines = [f"noise scale B_simple: {n['value']:.4g} (IQR {n['low']:.4g}-{n['high']:.4g}, "
             f"median of {n['count']} per-step estimates, second half of the run)",
             f"critical batch: {advice['critical_batch']:.4g}",
             "predicted cost to a given loss (empirical model, S_min/E_min = 1):",
             f"  {'global':>7} {'micro':>6} {'accum':>6} {'lr':>10} {'steps S/S_min':>22} "
             f"{'samples E/E_min':>22}"]
    for r in advice["table"]:
        mark = " <- configured" if r["global_size"] == conf["global_size"] else ""
        if r["global_size"] == rec["global_size"]:
            mark += " <- recommended"
        s_lo, s_hi = r["steps_ratio_range"]
        e_lo, e_hi = r["samples_ratio_range"]
        lines.append(f"  {r['global_size']:>7} {r['micro_size']:>6} {r['accum_steps']:>6} "
                     f"{r['lr']:>10.4g} {r['steps_ratio']:>8.3f} ({s_lo:.2f}-{s_hi:.2f}) "
                     f"{r['samples_ratio']:>8.3f} ({e_lo:.2f}-{e_hi:.2f}){mark}")
    lines.append(f"recommended global batch: {rec['global_size']} = micro {rec['micro_size']} x "
                 f"accum {rec['accum_steps']} x world {rec['world_size']}, lr {rec['lr']:.4g} "
                 f"(optim.scale_rule {scale_rule})")
    return "\n".join(lines)


def check_steps(steps: int) -> None:
    """``--steps`` must leave at least one estimate in the second half (and a first step to
    start the EMAs on).

    Raises:
        ConfigError: fewer than 2 steps.
    """
    if steps < 2:
        raise ConfigError(f"--steps={steps} must be >= 2 (the estimate is the second half of "
                          f"the run's per-step values)")
