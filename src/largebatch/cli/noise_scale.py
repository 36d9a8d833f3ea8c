"""``largebatch noise-scale CONFIG``: measure the gradient noise scale, advise a global batch.

Runs the real training (``largebatch.train.build.train``) for ``--steps`` optimizer steps with
``train.noise_scale=true`` in a temporary output directory, reads the per-step estimates
from its metrics, and prints what the empirical model of large-batch training predicts
(``largebatch.noise.advice``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from largebatch.config import Config, ConfigError, load_config
from largebatch.io import read_jsonl
from largebatch.plan import BatchPlan, noise_split, scaled_lr

HELP = "measure the gradient noise scale and advise a global batch and its LR"
HARD_EXIT = True
EXAMPLES = """\
examples:
  largebatch noise-scale configs/mnist/seed.yaml batch.global_size=240 batch.micro_size=60
  largebatch noise-scale configs/mnist/seed.yaml --steps 100 optim.scale_rule=sqrt --json
  torchrun --standalone --nproc_per_node 2 -m largebatch noise-scale configs/mnist/seed.yaml \\
      batch.global_size=240

B_simple is the median of the per-step estimates over the second half of the run, with their
interquartile range. One process without accumulation has no small batch to compare with:
the window is then split into micro-batches as the study's runs split it (micro global/p x
accum p, p the smallest prime factor of the global batch: global/2 x 2 when it is even), the
global batch unchanged. The advice keeps the configured micro size and world: the recommended
batch is the multiple of micro x world closest to B_simple, its LR the one optim.scale_rule
gives."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides, applied over the file")
    parser.add_argument("--steps", type=int, default=50,
                        help="optimizer steps to measure over (default 50, at least 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def measurement_overrides(cfg: Config, steps: int, world_size: int, out_dir: str,
                          ) -> tuple[list[str], Optional[str]]:
    """The overrides that turn the user's config into the measuring run, and the one line
    saying the window was split (None when it was not)."""
    from largebatch.train.build import plan_for
    plan = plan_for(cfg, world_size)
    # Enough epochs for the steps; max_steps is what stops the run.
    epochs = max(cfg.train.epochs, math.ceil(steps / plan.steps_per_epoch))
    extra = [f"train.max_steps={steps}", f"train.epochs={epochs}", "train.noise_scale=true",
             "train.stop_at_target=false", "train.time_budget_s=0", f"log.out_dir={out_dir}",
             "log.every_steps=1", "log.progress=false", "log.wandb.mode=disabled",
             "checkpoint.resume=never", "checkpoint.every_steps=0", "checkpoint.dir=null"]
    note = None
    if plan.world_size == 1 and plan.accum_steps == 1:
        g = plan.global_size
        split = noise_split(g, plan.world_size)  # the one rule (the study's runs use it too)
        if split is None:
            raise ConfigError(f"batch.global_size={g} on one process cannot be split into "
                              f"micro-batches: the noise scale needs at least two samples per "
                              f"step")
        micro, accum = split
        extra += [f"batch.global_size={g}", f"batch.micro_size={micro}",
                  f"batch.accum_steps={accum}"]
        note = (f"noise-scale: one process and one micro-batch per step give no small batch; "
                f"measuring with micro {micro} x accum {accum} (global {g} unchanged)")
    return extra, note


def read_train_records(out_dir: Path) -> list[dict[str, Any]]:
    """The run's ``kind: train`` records of applied steps, in step order (none without a
    metrics.jsonl; a non-finite noise_scale arrives as a string, which ``summarize`` reads)."""
    records = read_jsonl(out_dir / "metrics.jsonl", kind="train")
    return [r for r in records if r.get("applied", True)]


def run(args: argparse.Namespace) -> int:
    """Measure, then print the advice (rank 0). Returns the exit code."""
    from largebatch.dist import destroy_process_group, detect_launch
    from largebatch.noise.advice import advise, check_steps, render, summarize
    from largebatch.train.build import plan_for, train
    check_steps(args.steps)
    cfg = load_config(args.config, args.overrides)
    denv = detect_launch()
    configured = plan_for(cfg, denv.world_size)  # the advice keeps its micro size and world
    with tempfile.TemporaryDirectory(prefix="largebatch-noise-") as tmp:
        extra, note = measurement_overrides(cfg, args.steps, denv.world_size, tmp)
        run_cfg = load_config(args.config, list(args.overrides) + extra)
        if denv.is_main:
            measured = run_cfg_plan(run_cfg, denv.world_size)
            lines = [note] if note else []
            lines.append(f"noise-scale: measuring {args.steps} steps at global "
                         f"{measured['global_size']} = micro {measured['micro_size']} x accum "
                         f"{measured['accum_steps']} x world {measured['world_size']}")
            print("\n".join(lines), file=sys.stderr if args.json else sys.stdout, flush=True)
        # --json: stdout carries the one object only, the run's own lines go to stderr.
        sink = sys.stderr if args.json else sys.stdout
        with contextlib.redirect_stdout(sink):
            summary = train(run_cfg, quiet=True)
        destroy_process_group()
        configured = with_found_lr(configured, summary)
        if not denv.is_main:
            return 0
        records = read_train_records(Path(tmp))
    estimate = summarize(r.get("noise_scale") for r in records)
    if estimate is None:
        print(f"largebatch: noise-scale: no usable estimate in {len(records)} steps (the "
              f"|G|^2 estimate stayed <= 0, or this engine cannot measure it): try more "
              f"--steps or a larger batch", file=sys.stderr, flush=True)
        return 1
    advice = advise(estimate, configured)
    advice["steps"] = len(records)
    advice["measured_with"] = {k: run_cfg_plan(run_cfg, denv.world_size)[k]
                               for k in ("global_size", "micro_size", "accum_steps",
                                         "world_size")}
    advice["split_window"] = note is not None
    advice["scale_rule"] = configured.scale_rule
    print(json.dumps(advice) if args.json else render(advice, configured.scale_rule),
          flush=True)
    return 0


def with_found_lr(configured: BatchPlan, summary: dict[str, Any]) -> BatchPlan:
    """With ``optim.lr=auto`` the configured plan holds a placeholder base LR of 1 until the
    range test has run: take the base LR the measuring run found (the test ran at the same
    global batch), so the advice's LR column is the rule applied to a real LR."""
    if (configured.lr_auto or {}).get("source") != "pending":
        return configured
    found = summary["plan"]
    return dataclasses.replace(configured, base_lr=found["base_lr"], lr_auto=found["lr_auto"],
                               peak_lr=scaled_lr(found["base_lr"], configured.scale_rule,
                                                 configured.global_size, configured.base_batch))


def run_cfg_plan(cfg: Config, world_size: int) -> dict[str, Any]:
    """The measuring run's plan as JSON (what was measured with)."""
    from largebatch.train.build import plan_for
    return plan_for(cfg, world_size).to_json()
