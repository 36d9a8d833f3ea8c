"""``largebatch plan CONFIG [key=value...]``: print the batch plan without reading data."""
from __future__ import annotations

import argparse
import json

from largebatch.cli.args import add_config_arguments

HELP = "print the batch plan without training"
EXAMPLES = """\
examples:
  largebatch plan configs/mnist/seed.yaml
  largebatch plan configs/mnist/seed.yaml batch.global_size=4096 batch.micro_size=512 --world-size 4
  largebatch plan configs/mnist/large_batch.yaml --world-size 4 --json

Reads no data: prints global = micro x accum x world, steps per epoch, the scaled LR, warmup."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: config, overrides, ``--world-size``, ``--json``.

    Args:
        parser: the ``plan`` sub-command's parser.
    """
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, default=None,
                        help="world size to plan for (default: the launch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Plan the run for the given (or the launch's) world size and print it.

    Args:
        args: the parsed ``config``, ``overrides``, ``world_size`` and ``json``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.config import load_config
    from largebatch.dist import detect_launch
    from largebatch.tasks import build_task
    from largebatch.train.build import plan_for
    cfg = load_config(args.config, args.overrides)
    world = args.world_size if args.world_size is not None else detect_launch().world_size
    plan = plan_for(cfg, world)
    task = build_task(cfg)  # the task adds what it knows about the plan (e.g. head memory)
    if args.json:
        print(json.dumps({**plan.to_json(), **task.plan_report(plan)}))
    else:
        print("\n".join([plan.describe(), *task.describe_plan(plan)]))
    return 0
