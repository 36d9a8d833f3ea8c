"""``optim.lr: auto``: the LR range test at run start picks the run's peak LR.

``build_run`` builds the run as usual, with a unit base LR in the plan (``make_plan``: the
plan's ``peak_lr`` is then the scaling rule's factor, ``lr_auto = {"source": "pending"}``),
and hands the built trainer to ``resolve_lr``:

* **Fresh run**: ``largebatch.tune.lr_find.lr_find`` runs the ramp at the planned global batch
  through the real engine (its defaults, the same as ``largebatch lr-find CONFIG``: 1e-6 to 10
  over at most 100 optimizer steps) and restores model, optimizer, schedule, counters, RNGs and
  the loader's epoch exactly, so the training starts from the original initialisation on the
  data it would have seen. The suggested peak LR (``min(steepest, max_stable)``) becomes the
  plan's ``peak_lr`` (``base_lr = peak / factor``, so ``optim.scale_rule`` growth and the
  goodput adapter keep scaling from it), the schedule's peak and the param groups' LR.
* **Warmup**: the suggested warmup (steps and start factor) is used only when the config sets
  none (``schedule.warmup_steps`` and ``schedule.warmup_epochs`` both 0) and it is shorter than
  the run (``schedule.total_steps``, else ``train.epochs`` worth of steps; ``train.max_steps``
  is left out so that a run cut by it and resumed chooses alike); otherwise the config's
  warmup stays. To train at the found
  peak without warmup, set ``schedule.warmup_steps=1 schedule.warmup_start_factor=1`` (a
  warmup that starts at the peak).
* **Resumed run** (a checkpoint was loaded): the test does not run again; the LR fields come
  from the checkpoint's plan (its ``lr_auto`` record holds the warmup start factor), so the
  schedule continues exactly as the uninterrupted run.

The losses the ramp sees are the global batch's (the trainer's step agrees on them), so every
rank computes the same suggestion; one max-reduce of the three numbers makes that agreement a
guarantee. Rank 0 prints one line and writes ``lr_find.json`` / ``lr_find.png`` into
``log.out_dir``; the record is the plan's ``lr_auto`` field (``plan.json``, ``summary.json``'s
``plan``, every checkpoint's plan).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from largebatch.config import Config, ConfigError
from largebatch.plan import BatchPlan


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def resolve_lr(cfg: Config, trainer: Any, is_main: bool, source: Any = None,
               quiet: bool = False) -> BatchPlan:
    """Set the run's peak LR for ``optim.lr=auto`` (every rank calls it, after a resume).

    Args:
        cfg: the run's config (``cfg.optim.lr == 'auto'``).
        trainer: the built trainer, not yet trained (or just loaded from ``source``).
        is_main: rank 0 (prints, writes the finder's files and plan.json).
        source: the checkpoint set the run resumed from, or None for a fresh run.
        quiet: print nothing.

    Returns:
        The run's initial plan with the LR fields and the ``lr_auto`` record filled in.

    Raises:
        ConfigError: the range test gave no suggestion, or the checkpoint holds no LR.
    """
    if source is not None:
        record, current = _from_checkpoint(source)
        line = (f"optim.lr=auto: resumed with peak LR {record['peak_lr']:.4g} found by lr-find "
                f"at the run's start (not run again)")
    else:
        record = _find(cfg, trainer, is_main)
        current = {k: record[k] for k in ("base_lr", "peak_lr", "warmup_steps")}
        line = (f"optim.lr=auto: lr-find suggests peak LR {record['peak_lr']:.4g} (steepest "
                f"{_fmt(record['steepest'])}, max_stable {_fmt(record['max_stable'])}); "
                f"training with it, warmup {record['warmup_steps']} steps "
                f"({record['warmup_from']})")
    initial = dataclasses.replace(trainer.initial_plan, lr_auto=record,
                                  **{k: record[k] for k in ("base_lr", "peak_lr", "warmup_steps")})
    # After a resume the plan in force is the checkpoint's (maybe grown or resized since):
    # only its LR fields are put back, from the checkpoint, whatever else changed.
    current = initial if trainer.plan is trainer.initial_plan else \
        dataclasses.replace(trainer.plan, lr_auto=record, **current)
    trainer.use_lr_plan(initial, current, record["warmup_start_factor"])
    if is_main:
        trainer.logger.write_json("plan.json", initial.to_json())
        if not quiet:
            print(line, flush=True)
    return initial


def _find(cfg: Config, trainer: Any, is_main: bool) -> dict[str, Any]:
    """Run the range test (restoring the run), agree on the suggestion, write its files."""
    from largebatch.tune.lr_find import lr_find, write_outputs
    result = lr_find(trainer)
    s = result.suggestions
    if s.get("lr") is None:
        raise ConfigError(f"optim.lr=auto: lr-find found no peak LR ({s.get('note')}, stopped: "
                          f"{result.stop_reason}); set optim.lr to a number")
    steps, factor, warmup_from = _warmup(cfg, trainer, s)
    # Identical on every rank already (global losses); the max-reduce makes sure of it.
    peak, steps, factor = trainer.engine.reduce_scalars([float(s["lr"]), float(steps),
                                                         float(factor)], op="max")
    plan = trainer.initial_plan
    scale = plan.peak_lr / plan.base_lr  # the rule's factor: the plan was made at base 1
    if is_main:
        write_outputs(result, Path(cfg.log.out_dir))
    return {"source": "lr_find", "peak_lr": peak, "base_lr": peak / scale,
            "steepest": s["steepest"], "max_stable": s["max_stable"],
            "lr_at_min": s["lr_at_min"], "onset": s["onset"], "stop_reason": result.stop_reason,
            "ramp_steps": len(result.lrs), "global_size": plan.global_size,
            "warmup_steps": int(steps), "warmup_start_factor": factor,
            "warmup_from": warmup_from, "note": s.get("note") or "", "json": "lr_find.json"}


def _warmup(cfg: Config, trainer: Any, s: dict[str, Any]) -> tuple[int, float, str]:
    """(steps, start factor, where from): the config's warmup if it sets one, else lr-find's."""
    sc = cfg.schedule
    if sc.warmup_steps or sc.warmup_epochs:
        return trainer.initial_plan.warmup_steps, sc.warmup_start_factor, "the config's"
    steps = int(s.get("warmup_steps") or 0)
    # The run's planned length without train.max_steps' cap: a run cut by max_steps and
    # resumed with a larger one then picks the same warmup as the uninterrupted run.
    total = sc.total_steps or trainer.initial_plan.planned_steps(cfg.train.epochs)
    if steps and steps >= total:  # a warmup as long as the run would never reach the peak
        return 0, sc.warmup_start_factor, f"lr-find's {steps} not shorter than the run's {total}"
    if not steps:
        return 0, sc.warmup_start_factor, "lr-find's"
    return steps, float(s["warmup_start_factor"]), "lr-find's"


def _from_checkpoint(source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The record and the LR fields of the checkpoint's plan (as it was when it was written)."""
    saved = source.info.plan or {}
    record = saved.get("lr_auto") or {}
    if record.get("source") != "lr_find":
        raise ConfigError(f"optim.lr=auto: the checkpoint {source.path} holds no LR found by "
                          f"lr-find (its plan: base_lr={saved.get('base_lr')}); resume it with "
                          f"that optim.lr, or start in a fresh log.out_dir")
    return record, {k: saved[k] for k in ("base_lr", "peak_lr", "warmup_steps")}
