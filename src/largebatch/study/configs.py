"""The configs of the study's runs: each (arm, batch size)'s convergence run and timing passes.

Config precedence for one run: defaults < study config < arm config file < arm overrides <
command-line overrides < the sweep's own keys (batch size, epochs, budget, target, eval
cadence, output directory). Every run's config is built and its batch plan checked before the
first one trains (``prepare_runs``), so a bad arm fails in seconds, not after an hour.

The batch numbers come from the batch plan (``largebatch.plan``): a run's micro size is the
plan's (``resolve_batch`` with no accumulation; ``noise_split`` when the run measures the
gradient noise scale) and a timing pass's steps are ``BatchPlan.steps_for`` its samples.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from largebatch.config import ArmConfig, Config, ConfigError, load_config, to_dict
from largebatch.io import set_dotted
from largebatch.plan import BatchPlan, micro_candidates, noise_split, resolve_batch
from largebatch.study.sweep import (TIMING_MIN_STEPS, TIMING_SAMPLES, TIMING_TEST_SUBSET, RunSpec,
                                    Sweep, arm_sizes)


def arm_file(arm: ArmConfig, config_dir: Path) -> Optional[Path]:
    """The arm's config file, relative to the study config's folder (None: overrides only)."""
    if not arm.config:
        return None
    path = Path(arm.config)
    return path if path.is_absolute() else config_dir / path


def arm_mapping(cfg: Config, arm: ArmConfig, config_dir: Path,
                cli_overrides: list[str]) -> dict[str, Any]:
    """The arm's config as a raw mapping: study config < arm file < arm overrides < CLI."""
    cfg_arm = load_config(arm_file(arm, config_dir), list(arm.overrides) + list(cli_overrides),
                          base=to_dict(cfg))
    return to_dict(cfg_arm)


def capped_split(batch_size: int, world_size: int, max_micro: Optional[int]) -> tuple[int, int]:
    """``(micro, accum)`` of a run: one micro-batch per rank per step, or under
    ``study.max_micro`` the largest micro size the plan allows that keeps the batch."""
    _, micro, accum = resolve_batch(batch_size, None, 1, world_size)  # one micro per step
    if max_micro is not None and micro > max_micro:
        micro = max(m for m in micro_candidates(batch_size, world_size) if m <= max_micro)
        _, micro, accum = resolve_batch(batch_size, micro, None, world_size)
    return micro, accum


def _common(mapping: dict[str, Any], sweep: Sweep, batch_size: int, world_size: int,
            out: Path) -> dict[str, Any]:
    """The keys every run of one (arm, batch size) shares: the batch without accumulation
    (one micro-batch per rank per step; under ``study.max_micro`` accumulated micro-batches),
    the data subsets, no resume, the output folder."""
    m = copy.deepcopy(mapping)
    micro, _ = capped_split(batch_size, world_size, sweep.max_micro)
    set_dotted(m, "batch.global_size", batch_size)
    set_dotted(m, "batch.micro_size", micro)
    set_dotted(m, "batch.accum_steps", None)
    cap = m["batch"].get("max_global_size")
    if cap is not None and cap < batch_size:
        set_dotted(m, "batch.max_global_size", batch_size)
    set_dotted(m, "data.subset", sweep.subset)
    set_dotted(m, "data.test_subset", sweep.test_subset)
    set_dotted(m, "train.max_steps", 0)
    set_dotted(m, "checkpoint.resume", "never")
    set_dotted(m, "checkpoint.every_steps", 0)
    set_dotted(m, "log.out_dir", str(out))
    return m


def train_config(mapping: dict[str, Any], sweep: Sweep, batch_size: int, world_size: int,
                 out: Path) -> Config:
    """The convergence run: epoch and time caps, the target, per-step loss logging; with
    ``study.noise_scale`` the window split the plan gives for measuring B_simple."""
    m = _common(mapping, sweep, batch_size, world_size, out)
    split = noise_split(batch_size, world_size) if sweep.noise_scale else None
    capped = capped_split(batch_size, world_size, sweep.max_micro)
    if split is not None and capped[1] > 1:  # accumulating anyway: its micro-batches measure
        split = capped
    set_dotted(m, "train.noise_scale", split is not None)
    if split is not None:
        set_dotted(m, "batch.micro_size", split[0])
        set_dotted(m, "batch.accum_steps", split[1])
    set_dotted(m, "train.epochs", sweep.max_epochs)
    set_dotted(m, "train.time_budget_s", sweep.budget_s)
    set_dotted(m, "train.target_acc", sweep.target_acc)
    set_dotted(m, "train.stop_at_target", sweep.stop_at_target and sweep.target_acc > 0)
    set_dotted(m, "train.eval_every_samples", sweep.eval_every_samples)
    set_dotted(m, "log.every_steps", 1)  # the loss of every iteration (oscillation figure)
    return load_config(base=m)


def timing_config(mapping: dict[str, Any], sweep: Sweep, batch_size: int, world_size: int,
                  out: Path, loader: str, steps: int) -> Config:
    """A timing pass: ``steps`` optimizer steps with ``loader``, nothing else in the loop."""
    m = _common(mapping, sweep, batch_size, world_size, out)
    set_dotted(m, "data.loader", loader)
    test_subset = min(sweep.test_subset or TIMING_TEST_SUBSET, TIMING_TEST_SUBSET)
    set_dotted(m, "data.test_subset", test_subset)
    set_dotted(m, "train.epochs", 1.0)
    set_dotted(m, "train.max_steps", steps)
    set_dotted(m, "train.time_budget_s", 0.0)
    set_dotted(m, "train.target_acc", 0.0)
    set_dotted(m, "train.stop_at_target", False)
    set_dotted(m, "train.eval_every_samples", 0)
    set_dotted(m, "train.noise_scale", False)  # Claim A times the plain step: micro B x accum 1
    set_dotted(m, "batch.adapt", "none")  # the step at this batch, not an adaptive one's
    # Per-step JSON lines and a progress bar would be neither data nor compute time.
    set_dotted(m, "log.every_steps", 10 ** 9)
    set_dotted(m, "log.progress", False)
    set_dotted(m, "log.wandb.mode", "disabled")
    return load_config(base=m)


def timing_steps(plan: BatchPlan, samples: int = TIMING_SAMPLES) -> int:
    """Steps of a timing pass: >= ``samples`` samples and TIMING_MIN_STEPS, <= one epoch."""
    return min(max(plan.steps_for(samples), TIMING_MIN_STEPS), plan.steps_per_epoch)


def prepare_runs(cfg: Config, sweep: Sweep, config_dir: Path, cli_overrides: list[str],
                 out_dir: Path, world_size: int) -> tuple[list[RunSpec], list[str]]:
    """Every run's config, plans checked up front. Returns (runs, notes on skipped arms).

    Raises:
        ConfigError: arm names repeat, or an arm's config or batch plan is invalid.
    """
    from largebatch.train.build import plan_for  # lazily: it imports torch and the engines
    runs, notes = [], []
    names = [a.name for a in cfg.study.arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"study.arms: arm names must be unique, got {names}")
    for arm in cfg.study.arms:
        path = arm_file(arm, config_dir)
        if path is not None and not path.is_file():
            notes.append(f"arm '{arm.name}' skipped: its config file {path} does not exist")
            continue
        mapping = arm_mapping(cfg, arm, config_dir, cli_overrides)
        for b in arm_sizes(sweep, arm.sizes):
            run_dir = out_dir / arm.name / f"bs{b}"
            train_cfg = train_config(mapping, sweep, b, world_size, run_dir)
            spec = RunSpec(arm.name, b, train_cfg, plan_for(train_cfg, world_size))
            steps = timing_steps(spec.plan, sweep.timing_samples)
            for loader in sweep.loaders:
                spec.timing_cfgs[loader] = timing_config(
                    mapping, sweep, b, world_size, run_dir / f"timing_{loader}", loader, steps)
            spec.timing_plan = plan_for(next(iter(spec.timing_cfgs.values())), world_size)
            runs.append(spec)
    return runs, notes
