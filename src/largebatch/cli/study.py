"""``largebatch study CONFIG [key=value...]``: run a batch-size study (MNIST or faces), write its
report."""
from __future__ import annotations

import argparse

from largebatch.cli.args import add_config_arguments

HELP = "run a batch-size study (MNIST or faces)"
EXAMPLES = """\
examples:
  largebatch study configs/mnist/study.yaml                      # the full sweep, < 1 h on 2 cores
  largebatch study configs/mnist/study.yaml study.quick=true     # a smoke version, ~1 min
  largebatch study configs/mnist/study.yaml study.batch_sizes=[60,600] log.out_dir=runs/s2
  largebatch study configs/face/study.yaml                       # faces: 20,000 ids, bs 128..16384

Writes log.out_dir/study.md with its table, figures and verdicts."""
#: A finished process exits without interpreter teardown (see ``largebatch.cli.main``).
HARD_EXIT = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: the study config and its overrides.

    Args:
        parser: the ``study`` sub-command's parser.
    """
    add_config_arguments(parser, "study YAML (e.g. configs/mnist/study.yaml)")


def run(args: argparse.Namespace) -> int:
    """Load the study config and run every arm of the study.

    Args:
        args: the parsed ``config`` and ``overrides``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.config import load_config
    from largebatch.study.runner import run_study
    cfg = load_config(args.config, args.overrides)
    run_study(cfg, config_path=args.config, overrides=args.overrides)
    return 0
