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
as the plan's ``noise_split`` gives: micro B/p x accum p, p the smallest prime factor of B
(B/2 x 2 for an even B; the global batch, the LR and the updates are unchanged, only the
measurement's cost and two half-size forward passes are added to the run's time). Batch 1 has
no smaller batch: not measured. The timing passes always run micro B/world x accum 1 without
the estimate (Claim A's numbers).

The sweep is ``sweep.make_sweep``'s, every run's config and plan come from
``configs.prepare_runs`` (all checked before the first run trains), each run's records become
a report row in ``measure``, and ``report`` writes the study; this module runs them in order.
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from largebatch.config import Config, ConfigError, load_config, to_dict
from largebatch.dist import DistEnv, detect_launch
from largebatch.study.configs import prepare_runs
from largebatch.study.face_measure import TAR_KEY, face_columns, face_curve, primary_metric
from largebatch.study.measure import (convergence_columns, noise_columns, primary_timing,
                                      read_metrics, skipped_row, timing_columns)
from largebatch.study.sweep import TIMING_MIN_STEPS, RunSpec, Sweep, make_sweep


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
    cols, losses, evals = convergence_columns(summary, records, spec, sweep,
                                              primary_metric(spec.train_cfg))
    noise_cols, noise_curve = noise_columns(records, spec.train_cfg.train.noise_scale)
    row = {**cols, **noise_cols, **timing, "accum_steps": spec.plan.accum_steps,
           "timing_micro_size": tplan.micro_size, "timing_accum_steps": tplan.accum_steps}
    if spec.train_cfg.task.name == "face":
        row.update(face_columns(summary, records, spec.train_cfg, spec.plan))
        for point, face in zip(evals, face_curve(records)):
            point[TAR_KEY] = face[TAR_KEY]
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
    """B_simple early -> late for the progress line ('n/a' when not measured)."""
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


def quick_config(cfg: Config, overrides: list[str]) -> Config:
    """The study config under ``study.quick=true``: ``study.quick_overrides`` applied over it,
    the command line's ``overrides`` again over them (the command line wins)."""
    if not (cfg.study.quick and cfg.study.quick_overrides):
        return cfg
    return load_config(None, list(cfg.study.quick_overrides) + list(overrides), base=to_dict(cfg))


def report_writer(cfg: Config) -> Callable[..., dict]:
    """The report of the study's task: the face study's (``face_report``) or MNIST's."""
    if cfg.task.name == "face":
        from largebatch.study.face_report import write_face_report
        return write_face_report
    from largebatch.study.report import write_report
    return write_report


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
    cfg = quick_config(cfg, overrides)
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
    paths = report_writer(cfg)(out_dir, rows, curves, evals, meta, noise)
    say(f"study: done in {meta['wall_s']:.0f} s; report {paths['md']}")
    return rows
