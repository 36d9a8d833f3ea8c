"""What the study runs: the batch-size sweep (``Sweep``, ``make_sweep``) and the configs and
plans of one (arm, batch size) (``RunSpec``).

Plain data and validation only: ``configs`` fills a ``RunSpec`` per (arm, batch size),
``measure`` reads one, ``runner`` runs it. Nothing here imports another study module, so each
of them can import this one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from largebatch.config import Config, ConfigError
from largebatch.plan import BatchPlan

# Timing passes: enough samples that the first (slow) step is noise, capped at one epoch.
TIMING_SAMPLES = 6000
TIMING_MIN_STEPS = 5
TIMING_TEST_SUBSET = 100  # the timing pass's final evaluation is excluded anyway: keep it cheap

# Quick mode (tests, smoke runs): a data subset, the mid-size batches, two short epochs.
QUICK_SUBSET = 6000
QUICK_TEST_SUBSET = 1000
QUICK_TIMING_SAMPLES = 1200  # a fifth of the subset's epoch, extrapolated like the full study
QUICK_MAX_EPOCHS = 2.0
QUICK_BUDGET_S = 30.0
QUICK_TARGET = 0.90  # 98% is out of reach on a 6000-sample subset in two epochs
QUICK_EVALS_PER_EPOCH = 5
QUICK_FALLBACK_SIZES = [6, 60, 600]
ARM_SIZES = ("all", "smallest", "largest")  # which of the sweep's batch sizes an arm runs


@dataclass(frozen=True)
class Sweep:
    """What the study runs: batch sizes (and the ones skipped, with why), caps and cadence."""

    batch_sizes: list[int]
    skipped: dict[int, str]
    max_epochs: float
    budget_s: float
    target_acc: float
    eval_every_samples: int
    subset: int
    test_subset: int
    loaders: list[str]
    loss_iters: int
    quick: bool
    noise_scale: bool = False
    timing_samples: int = TIMING_SAMPLES
    stop_at_target: bool = True
    max_micro: Optional[int] = None


@dataclass
class RunSpec:
    """The configs of one (arm, batch size): the convergence run and the timing passes."""

    arm: str
    batch_size: int
    train_cfg: Config
    plan: BatchPlan
    timing_cfgs: dict[str, Config] = field(default_factory=dict)
    timing_plan: Optional[BatchPlan] = None  # the timing passes' plan (accum 1); None: ``plan``


def _check_study(cfg: Config) -> tuple[list[int], list[str]]:
    """The study section's batch sizes and loaders (repeats dropped, order kept), validated.

    Raises:
        ConfigError: an empty or non-positive list, a non-positive cap, an unknown loader.
    """
    st = cfg.study
    sizes = list(dict.fromkeys(st.batch_sizes))  # keep order, drop repeats
    if not sizes:
        raise ConfigError("study.batch_sizes is empty; give at least one batch size")
    bad = [b for b in sizes if b < 1]
    if bad:
        raise ConfigError(f"study.batch_sizes={st.batch_sizes}: {bad} must be positive integers")
    for key, value in (("study.max_epochs", st.max_epochs), ("study.loss_iters", st.loss_iters)):
        if not value > 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if st.budget_s < 0:
        raise ConfigError(f"study.budget_s={st.budget_s} must be >= 0 (0 = no budget)")
    if not st.arms:
        raise ConfigError("study.arms is empty; give at least one arm")
    loaders = list(dict.fromkeys(st.loaders))
    if not loaders:
        raise ConfigError("study.loaders is empty; give memory and/or torch (Claim A's timings)")
    for loader in loaders:
        if loader not in ("memory", "torch"):
            raise ConfigError(f"study.loaders: {loader!r} is not one of memory|torch")
    if st.max_micro is not None and st.max_micro < 1:
        raise ConfigError(f"study.max_micro={st.max_micro} must be >= 1 (or null)")
    for arm in st.arms:
        if arm.sizes not in ARM_SIZES:
            raise ConfigError(f"study.arms: arm '{arm.name}' sizes={arm.sizes!r} is not one of "
                              f"{'|'.join(ARM_SIZES)}")
    return sizes, loaders


def arm_sizes(sweep: Sweep, which: str) -> list[int]:
    """The sweep's batch sizes an arm runs (``ArmConfig.sizes``): all, the smallest or the
    largest of those this launch can run."""
    runnable = [b for b in sweep.batch_sizes if b not in sweep.skipped]
    if which == "all" or not runnable:
        return runnable
    return [min(runnable)] if which == "smallest" else [max(runnable)]


def make_sweep(cfg: Config, world_size: int) -> Sweep:
    """The sweep for this launch: quick-mode reductions and world-size divisibility applied.

    Raises:
        ConfigError: see ``_check_study``.
    """
    st = cfg.study
    sizes, loaders = _check_study(cfg)
    subset, test_subset = cfg.data.subset, cfg.data.test_subset
    max_epochs, budget, target = st.max_epochs, st.budget_s, cfg.train.target_acc
    every = cfg.train.eval_every_samples
    if st.quick:
        subset = min(subset, QUICK_SUBSET) if subset else QUICK_SUBSET
        test_subset = min(test_subset, QUICK_TEST_SUBSET) if test_subset else QUICK_TEST_SUBSET
        sizes = [b for b in sizes if 1 < b <= subset // 10] or QUICK_FALLBACK_SIZES
        max_epochs = min(max_epochs, QUICK_MAX_EPOCHS)
        budget = min(budget, QUICK_BUDGET_S) if budget else 0.0  # 0 stays 'no budget'
        target = min(target, QUICK_TARGET)
        every = subset // QUICK_EVALS_PER_EPOCH
    skipped = {b: f"batch size {b} is not divisible by world size {world_size}"
               for b in sizes if b % world_size}
    return Sweep(batch_sizes=sizes, skipped=skipped, max_epochs=max_epochs, budget_s=budget,
                 target_acc=target, eval_every_samples=every, subset=subset,
                 test_subset=test_subset, loaders=loaders, loss_iters=st.loss_iters,
                 quick=st.quick, noise_scale=st.noise_scale,
                 timing_samples=QUICK_TIMING_SAMPLES if st.quick else TIMING_SAMPLES,
                 stop_at_target=st.stop_at_target, max_micro=st.max_micro)
