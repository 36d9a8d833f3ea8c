"""``largebatch lr-find CONFIG [key=value...]``: the LR range test at the planned global batch."""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

HELP = ("LR range test at the planned global batch through the real engine: suggested peak LR "
        "and warmup; writes lr_find.json and lr_find.png")
EXAMPLES = """\
examples:
  largebatch lr-find configs/mnist/seed.yaml                       # SGD at batch 60
  largebatch lr-find configs/mnist/large_batch.yaml --steps 60 --max-lr 1
  largebatch lr-find configs/mnist/seed.yaml --min-lr 1e-5 --out runs/lrf --json
  torchrun --standalone --nproc_per_node 2 -m largebatch lr-find configs/mnist/seed.yaml \\
      batch.global_size=120 engine.name=ddp

An exponential ramp from --min-lr to --max-lr over --steps optimizer steps (stopping when the
smoothed loss exceeds 4x its best), then the model, optimizer, RNG and data position are put
back. Suggestions: steepest descent, max stable (minimum / 10), the smaller of the two as the
peak LR, and a warmup; printed with the overrides that train with them. Writes into --out
(default: log.out_dir) only lr_find.json and lr_find.png. Bad input: one line, exit 2."""
HARD_EXIT = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*",
                        help="dotted key=value overrides, applied over the file")
    parser.add_argument("--min-lr", type=float, default=1e-6, help="first LR (default 1e-6)")
    parser.add_argument("--max-lr", type=float, default=10.0, help="last LR (default 10)")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps of the ramp (default 100, at least 5)")
    parser.add_argument("--out", default=None, help="output folder (default: log.out_dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Build the run, test, restore, write the outputs (rank 0) and print the suggestions."""
    from largebatch.config import load_config
    from largebatch.dist import destroy_process_group
    from largebatch.train.build import build_run
    from largebatch.tune.lr_find import (check_args, format_summary, lr_find, train_overrides,
                                         write_outputs)
    check_args(args.min_lr, args.max_lr, args.steps)  # before any data is read
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.log.out_dir)
    scratch = Path(tempfile.mkdtemp(prefix="largebatch-lr-find-"))
    # The run's own files (plan.json, config.json, an empty metrics.jsonl) go to a scratch
    # folder: --out may be a finished run's folder, whose files must stay as they are. No
    # checkpoint set, no wandb run, no progress bar: nothing of this probe outlives it.
    cfg.log.out_dir = str(scratch)
    cfg.log.wandb.mode, cfg.log.progress = "disabled", False
    cfg.checkpoint.resume, cfg.checkpoint.dir, cfg.checkpoint.every_steps = "never", None, 0
    try:
        built = build_run(cfg, quiet=args.json)
        result = lr_find(built.trainer, args.min_lr, args.max_lr, args.steps)
        # The plan's base LR, not cfg.optim.lr: with optim.lr=auto the plan holds a unit base.
        extra = train_overrides(result, built.plan.base_lr, built.plan.peak_lr)
        if built.denv.is_main:
            json_path, _ = write_outputs(result, out)
            command = None if extra is None else " ".join(
                ["largebatch", "train", args.config, *args.overrides, *extra])
            if args.json:
                print(json.dumps({"suggestions": result.to_json()["suggestions"],
                                  "stop_reason": result.stop_reason, "steps": len(result.lrs),
                                  "train_overrides": extra, "json": str(json_path)}))
            else:
                print(format_summary(result))
                print(f"lr-find: wrote {json_path} and lr_find.png")
                if command:
                    print(f"lr-find: train with: {command}")
        built.logger.close({})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    destroy_process_group()
    return 0
