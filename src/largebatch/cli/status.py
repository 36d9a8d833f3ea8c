"""``largebatch status CONFIG [key=value...]``: say whether a run is finished, resumable or fresh.

Reads the run's checkpoint directory only (no tensor is loaded); the sbatch scripts requeue a
pre-empted job while this says ``resumable``.
"""
from __future__ import annotations

import argparse
import json

from largebatch.cli.args import add_config_arguments

HELP = "say whether a run is finished, resumable or fresh"
EXAMPLES = """\
examples:
  largebatch status configs/mnist/seed.yaml log.out_dir=runs/a     # finished|resumable|fresh
  largebatch status configs/mnist/seed.yaml --json

Reads the run's checkpoint directory (no tensor is loaded). The sbatch scripts requeue a
pre-empted job only while this says 'resumable'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: config, overrides, ``--json``.

    Args:
        parser: the ``status`` sub-command's parser.
    """
    add_config_arguments(parser, "YAML config file (with the run's overrides)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Print the state of the run's checkpoints (and the step of the latest set).

    Args:
        args: the parsed ``config``, ``overrides`` and ``json``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.checkpoint import run_status
    from largebatch.config import load_config
    from largebatch.train.build import checkpoint_dir
    cfg = load_config(args.config, args.overrides)
    directory = checkpoint_dir(cfg)
    status = {**run_status(directory), "dir": str(directory)}
    if args.json:
        print(json.dumps(status))
    else:
        where = f" at step {status['step']} ({status['set']})" if status["step"] is not None else ""
        print(f"{status['state']}{where}: {directory}")
    return 0
