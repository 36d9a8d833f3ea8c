"""``largebatch plot RUN_DIR [RUN_DIR ...]``: PNG curves of one or more runs' ``metrics.jsonl``.

What is drawn is the library's (:mod:`largebatch.plot`); this module reads the arguments,
picks the output folder and prints the path of every PNG written.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from largebatch.config import ConfigError
from largebatch.plot import DEFAULT_SMOOTH, build_figures, load_run, run_names, write_pngs

HELP = "plot a run's (or several runs') metrics.jsonl: loss, validation metrics, LR, batch size"
EXAMPLES = """\
examples:
  largebatch plot runs/mnist-seed                    # PNGs into runs/mnist-seed/
  largebatch plot runs/a runs/b --out plots/ab       # two runs overlaid, one legend entry each
  largebatch plot runs/a --smooth 50                 # loss moving average over 50 records

Reads RUN_DIR/metrics.jsonl (and plan.json for the batch size); a torn last line (a killed
run) is skipped. Prints the path of every PNG written."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: the run directories, ``--out``, ``--smooth``.

    Args:
        parser: the ``plot`` sub-command's parser.
    """
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (log.out_dir) holding metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="folder for the PNGs (default: the run's directory, or ./plots "
                             "for several runs)")
    parser.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH, metavar="K",
                        help=f"moving-average window of the smoothed loss, in logged records "
                             f"(default {DEFAULT_SMOOTH})")


def run(args: argparse.Namespace) -> int:
    """Read every run, build the figures, write the PNGs and print their paths.

    Args:
        args: the parsed ``run_dirs``, ``out`` and ``smooth``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: ``--smooth`` below 1, or a run directory that cannot be plotted.
    """
    if args.smooth < 1:
        raise ConfigError(f"--smooth must be >= 1 (got {args.smooth})")
    runs = [load_run(d, name) for d, name in zip(args.run_dirs, run_names(args.run_dirs))]
    out = Path(args.out) if args.out else (runs[0].path if len(runs) == 1 else Path("plots"))
    for path in write_pngs(build_figures(runs, args.smooth), runs, out):
        print(path)
    return 0
