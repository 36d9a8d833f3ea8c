"""``largebatch status CONFIG [key=value...]``: say whether a run is finished, resumable or fresh.

Reads the run's checkpoint directory (manifests and done marker against their schema, every
file's sha256) and, for a finished run, memory-maps its final ``model.pt`` (weights_only);
it never raises and never trains. The sbatch scripts requeue a pre-empted job while this
says ``resumable``.
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

Reads the run's checkpoint directory and, for a finished run, checks that its final
model.pt loads. States: finished, resumable, other_format, fresh, unreadable. The sbatch
scripts requeue a pre-empted job only while this says 'resumable'."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: config, overrides, ``--json``.

    Args:
        parser: the ``status`` sub-command's parser.
    """
    add_config_arguments(parser, "YAML config file (with the run's overrides)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    """Print the state of the run's checkpoints (and the step of the set a relaunch uses).

    One line: ``STATE[ at step N (SET)]: DIR[; NOTE]`` (the note says what was skipped and
    why), or with ``--json`` one object with ``state``, ``step``, ``set``, ``note``, ``dir``.

    Args:
        args: the parsed ``config``, ``overrides`` and ``json``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: a bad config or override (the caller prints it as one line, exit 2);
            nothing on disk makes it raise.
    """
    from pathlib import Path

    from largebatch.checkpoint import run_status
    from largebatch.config import load_config
    from largebatch.train.build import checkpoint_dir
    cfg = load_config(args.config, args.overrides)
    directory = checkpoint_dir(cfg)
    status = {**run_status(directory, Path(cfg.log.out_dir) / "model.pt"),
              "dir": str(directory)}
    if args.json:
        print(json.dumps(status))
    else:
        where = f" at step {status['step']} ({status['set']})" if status["step"] is not None else ""
        note = f"; {status['note']}" if status["note"] else ""
        print(f"{status['state']}{where}: {directory}{note}")
    return 0
