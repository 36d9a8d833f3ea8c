"""Run the batch-size study: every arm (recipe) over the batch-size sweep, measured, reported.

For each arm and batch size B the study makes, through ``largebatch.train.build.train`` (the very
trainer a user runs), two kinds of runs:

* one **convergence run** with the arm's own loader: at most ``study.max_epochs`` epochs and
  ``study.budget_s`` seconds of training time (evaluation excluded), stopping at
  ``train.target_acc``. It gives the loss of every iteration, time / updates / epochs to the
  target, and divergence (the trainer stops on a non-finite or exploding loss);
* one **timing pass per loader** in ``study.loaders``: a capped number of steps (at least
  ``TIMING_SAMPLES`` samples and ``TIMING_MIN_STEPS`` steps, at most one epoch) without a
  progress bar or per-step logging, extrapolated to a whole epoch. Training every batch size
  to the target with both loaders would double the cost for the same convergence numbers.

With ``study.noise_scale`` (default on) the convergence runs also measure the gradient noise
scale B_simple (``train.noise_scale``). Its small batches are the ranks' windows under DDP; on
one process they are the micro-batches of an accumulation window, so there a batch B >= 2 runs
as micro B/p x accum p, p the smallest prime factor of B (B/2 x 2 for an even B; the global
batch, the LR and the updates are unchanged, only the measurement's cost and two half-size
forward passes are added to the run's time). Batch 1 has no smaller batch: not measured. The
timing passes always run micro B/world x accum 1 without the estimate (Claim A's numbers).

Config precedence for one run: defaults < study config < arm config file < arm overrides <
command-line overrides < the sweep's own keys (batch size, epochs, budget, target, eval
cadence, output directory). Every run's config is built and its batch plan checked before
the first one trains, so a bad arm fails in seconds, not after an hour.
"""
from __future__ import annotations

import copy
import math
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from largebatch.config import ArmConfig, Config, ConfigError, load_config, to_dict
from largebatch.dist import DistEnv, detect_launch
from largebatch.plan import BatchPlan
from largebatch.study.measure import (convergence_columns, noise_columns, primary_timing,
                                      read_metrics, skipped_row, timing_columns)

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


@dataclass
class RunSpec:
    """The configs of one (arm, batch size): the convergence run and the timing passes."""

    arm: str
    batch_size: int
    train_cfg: Config
    plan: BatchPlan
    timing_cfgs: dict[str, Config] = field(default_factory=dict)
    timing_plan: Optional[BatchPlan] = None  # the timing passes' plan (accum 1); None: ``plan``


def make_sweep(cfg: Config, world_size: int) -> Sweep:
    """The sweep for this launch: quick-mode reductions and world-size divisibility applied."""
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
                 timing_samples=QUICK_TIMING_SAMPLES if st.quick else TIMING_SAMPLES)


# ---- configs ---------------------------------------------------------------------------------


def _set(mapping: dict, dotted: str, value: Any) -> None:
    node = mapping
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def arm_file(arm: ArmConfig, config_dir: Path) -> Optional[Path]:
    """The arm's config file, relative to the study config's folder (None: overrides only)."""
    if not arm.config:
        return None
    path = Path(arm.config)
    return path if path.is_absolute() else config_dir / path


def arm_mapping(cfg: Config, arm: ArmConfig, config_dir: Path,
                cli_overrides: list[str]) -> dict:
    """The arm's config as a raw mapping: study config < arm file < arm overrides < CLI."""
    cfg_arm = load_config(arm_file(arm, config_dir), list(arm.overrides) + list(cli_overrides),
                          base=to_dict(cfg))
    return to_dict(cfg_arm)


def _common(mapping: dict, sweep: Sweep, batch_size: int, world_size: int, out: Path) -> dict:
    m = copy.deepcopy(mapping)
    _set(m, "batch.global_size", batch_size)
    _set(m, "batch.micro_size", batch_size // world_size)  # no accumulation: one micro per step
    _set(m, "batch.accum_steps", None)
    cap = m["batch"].get("max_global_size")
    if cap is not None and cap < batch_size:
        _set(m, "batch.max_global_size", batch_size)
    _set(m, "data.subset", sweep.subset)
    _set(m, "data.test_subset", sweep.test_subset)
    _set(m, "train.max_steps", 0)
    _set(m, "checkpoint.resume", "never")
    _set(m, "checkpoint.every_steps", 0)
    _set(m, "log.out_dir", str(out))
    return m


def smallest_factor(n: int) -> int:
    """The smallest prime factor of ``n`` >= 2 (``n`` itself when prime)."""
    return next((p for p in range(2, math.isqrt(n) + 1) if n % p == 0), n)


def noise_split(batch_size: int, world_size: int) -> Optional[tuple[int, int]]:
    """``(micro, accum)`` of a convergence run that measures B_simple; None: not measurable.

    Under DDP the ranks' windows are the small batches: micro B/world, accum 1. On one process
    the window's micro-batches are: the fewest micro-batches that divide B, micro B/p x accum p
    (p the smallest prime factor; 2 for an even B, so the small batch is as large as it can be
    and the estimate's two batch sizes are only 2x apart at most). Batch 1 cannot be split.
    """
    if world_size > 1:
        return batch_size // world_size, 1
    if batch_size < 2:
        return None
    p = smallest_factor(batch_size)
    return batch_size // p, p


def train_config(mapping: dict, sweep: Sweep, batch_size: int, world_size: int,
                 out: Path) -> Config:
    """The convergence run: epoch and time caps, the target, per-step loss logging."""
    m = _common(mapping, sweep, batch_size, world_size, out)
    split = noise_split(batch_size, world_size) if sweep.noise_scale else None
    _set(m, "train.noise_scale", split is not None)
    if split is not None:
        _set(m, "batch.micro_size", split[0])
        _set(m, "batch.accum_steps", split[1])
    _set(m, "train.epochs", sweep.max_epochs)
    _set(m, "train.time_budget_s", sweep.budget_s)
    _set(m, "train.target_acc", sweep.target_acc)
    _set(m, "train.stop_at_target", sweep.target_acc > 0)
    _set(m, "train.eval_every_samples", sweep.eval_every_samples)
    _set(m, "log.every_steps", 1)  # the loss of every iteration (oscillation figure)
    return load_config(base=m)


def timing_config(mapping: dict, sweep: Sweep, batch_size: int, world_size: int, out: Path,
                  loader: str, steps: int) -> Config:
    """A timing pass: ``steps`` optimizer steps with ``loader``, nothing else in the loop."""
    m = _common(mapping, sweep, batch_size, world_size, out)
    _set(m, "data.loader", loader)
    test_subset = min(sweep.test_subset or TIMING_TEST_SUBSET, TIMING_TEST_SUBSET)
    _set(m, "data.test_subset", test_subset)
    _set(m, "train.epochs", 1.0)
    _set(m, "train.max_steps", steps)
    _set(m, "train.time_budget_s", 0.0)
    _set(m, "train.target_acc", 0.0)
    _set(m, "train.stop_at_target", False)
    _set(m, "train.eval_every_samples", 0)
    _set(m, "train.noise_scale", False)  # Claim A times the plain step: micro B x accum 1
    # Per-step JSON lines and a progress bar would be neither data nor compute time.
    _set(m, "log.every_steps", 10 ** 9)
    _set(m, "log.progress", False)
    _set(m, "log.wandb.mode", "disabled")
    return load_config(base=m)


def timing_steps(plan: BatchPlan, samples: int = TIMING_SAMPLES) -> int:
    """Steps of a timing pass: >= ``samples`` samples and TIMING_MIN_STEPS, <= one epoch."""
    want = max(math.ceil(samples / plan.global_size), TIMING_MIN_STEPS)
    return min(want, plan.steps_per_epoch)


def prepare_runs(cfg: Config, sweep: Sweep, config_dir: Path, cli_overrides: list[str],
                 out_dir: Path, world_size: int) -> tuple[list[RunSpec], list[str]]:
    """Every run's config, plans checked up front. Returns (runs, notes on skipped arms)."""
    from largebatch.train.build import plan_for
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
        for b in sweep.batch_sizes:
            if b in sweep.skipped:
                continue
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


# ---- running ---------------------------------------------------------------------------------


def run_one(spec: RunSpec, sweep: Sweep,
            denv: DistEnv) -> Optional[tuple[dict, list, list, list]]:
    """Timing passes then the convergence run of one (arm, batch size); rank 0 gets the row,
    the loss curve, the eval curve and the B_simple curve."""
    from largebatch.train.build import train
    timing: dict[str, Any] = {}
    tplan = spec.timing_plan or spec.plan
    for loader, tcfg in spec.timing_cfgs.items():
        train(tcfg, denv=denv, quiet=True)
        if denv.is_main:
            timing.update(timing_columns(read_metrics(tcfg.log.out_dir), tplan, loader))
    summary = train(spec.train_cfg, denv=denv, quiet=True)
    if not denv.is_main:
        return None
    records = read_metrics(spec.train_cfg.log.out_dir)
    cols, losses, evals = convergence_columns(summary, records, spec, sweep)
    noise_cols, noise_curve = noise_columns(records, spec.train_cfg.train.noise_scale)
    row = {**cols, **noise_cols, **timing, "accum_steps": spec.plan.accum_steps,
           "timing_micro_size": tplan.micro_size, "timing_accum_steps": tplan.accum_steps}
    row.update(primary_timing(row, spec.train_cfg.data.loader, sweep.loaders))
    return row, losses, evals, noise_curve


def plan_record(spec: RunSpec) -> dict[str, Any]:
    """What each run of one (arm, batch size) ran as: the convergence run and the timing
    passes (micro x accum x world), recorded in study.json."""
    tplan = spec.timing_plan or spec.plan
    return {"arm": spec.arm, "batch_size": spec.batch_size,
            "train": {"micro_size": spec.plan.micro_size, "accum_steps": spec.plan.accum_steps,
                      "world_size": spec.plan.world_size,
                      "noise_scale": spec.train_cfg.train.noise_scale},
            "timing": {"micro_size": tplan.micro_size, "accum_steps": tplan.accum_steps,
                       "world_size": tplan.world_size,
                       "noise_scale": any(c.train.noise_scale
                                          for c in spec.timing_cfgs.values()),
                       "loaders": list(spec.timing_cfgs)}}


def progress_line(index: int, total: int, row: dict, loaders: list[str]) -> str:
    """The one line printed when an (arm, batch size) finishes."""
    timing = "; ".join(f"{ld} epoch {row[f'{ld}_epoch_time_s']:.2f}s = data "
                       f"{row[f'{ld}_data_time_s']:.2f} + compute {row[f'{ld}_compute_time_s']:.2f}"
                       for ld in loaders)
    return (f"[{index}/{total}] {row['arm']} bs {row['batch_size']}: {row['outcome']}; "
            f"val_acc {row['final_val_acc']:.4f}; loss osc {row['loss_osc_1000']:.4f}; "
            f"{timing}; B_simple {_noise_text(row)}; wall {row['wall_s']:.1f}s")


def _noise_text(row: dict) -> str:
    early, late = row.get("noise_scale_early"), row.get("noise_scale_late")
    if late is None or not math.isfinite(late):
        return "n/a"
    return f"{early:.3g} -> {late:.3g}"


def command_line(config_path: Optional[str], overrides: list[str], world_size: int) -> str:
    """The command that reproduces this study (torchrun when it ran on several ranks)."""
    launcher = (f"torchrun --nproc_per_node={world_size} -m largebatch" if world_size > 1
                else "largebatch")
    threads = os.environ.get("OMP_NUM_THREADS")
    env = [f"OMP_NUM_THREADS={threads}"] if threads else []
    args = shlex.join([str(config_path or "<config>"), *overrides])  # copy-paste safe
    return " ".join(env + [launcher, "study", args])


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_study(cfg: Config, config_path: Optional[str] = None,
              overrides: Optional[list[str]] = None,
              denv: Optional[DistEnv] = None) -> list[dict]:
    """Run every arm over the sweep and write the report to ``cfg.log.out_dir`` (rank 0).

    Args:
        cfg: the study config (with CLI overrides applied).
        config_path: the study config file; arm config files are relative to its folder.
        overrides: the command-line overrides; re-applied over each arm's file.
        denv: the launch (default: detected; under torchrun every rank runs every run).

    Returns:
        The report rows on rank 0 (one per arm x batch size), an empty list on other ranks.
    """
    start = time.perf_counter()
    overrides = list(overrides or [])
    denv = denv or detect_launch()
    sweep = make_sweep(cfg, denv.world_size)
    out_dir = Path(cfg.log.out_dir)
    config_dir = Path(config_path).resolve().parent if config_path else Path.cwd()
    specs, notes = prepare_runs(cfg, sweep, config_dir, overrides, out_dir, denv.world_size)
    if not specs:
        raise ConfigError(f"study: nothing to run (batch sizes {sweep.batch_sizes}, skipped: "
                          f"{sweep.skipped or 'none'}; {'; '.join(notes) or 'no arm'})")
    say = (lambda text: print(text, flush=True)) if denv.is_main else (lambda text: None)
    for note in notes:
        say(f"study: {note}")
    say(f"study: {len(specs)} runs ({', '.join(dict.fromkeys(s.arm for s in specs))} x batch "
        f"sizes {[b for b in sweep.batch_sizes if b not in sweep.skipped]}), world size "
        f"{denv.world_size}, output {out_dir}")
    rows, curves, evals, noise = [], {}, {}, {}
    for i, spec in enumerate(specs, 1):
        result = run_one(spec, sweep, denv)
        if result is None:
            continue
        row, losses, ev, ns = result
        rows.append(row)
        curves.setdefault(spec.arm, {})[str(spec.batch_size)] = losses
        evals.setdefault(spec.arm, {})[str(spec.batch_size)] = ev
        noise.setdefault(spec.arm, {})[str(spec.batch_size)] = ns
        say(progress_line(i, len(specs), row, sweep.loaders))
    if not denv.is_main:
        return []
    arms = list(dict.fromkeys(s.arm for s in specs))
    for b, why in sweep.skipped.items():
        rows += [skipped_row(arm, b, why, denv.world_size) for arm in arms]
    rows.sort(key=lambda r: (arms.index(r["arm"]), r["batch_size"]))
    meta = {"command": command_line(config_path, overrides, denv.world_size),
            "wall_s": time.perf_counter() - start, "world_size": denv.world_size,
            "sweep": dict(sweep.__dict__),
            "timing": {"samples": sweep.timing_samples, "min_steps": TIMING_MIN_STEPS},
            "plans": [plan_record(s) for s in specs],
            "notes": notes, "environment": environment(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    from largebatch.study.report import write_report
    paths = write_report(out_dir, rows, curves, evals, meta, noise)
    say(f"study: done in {meta['wall_s']:.0f} s; report {paths['md']}")
    return rows
