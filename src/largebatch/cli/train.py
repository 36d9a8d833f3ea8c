"""``largebatch train CONFIG [key=value...]``: train one run (one process, or one rank of many)."""
from __future__ import annotations

import argparse

from largebatch.cli.args import add_config_arguments

HELP = "train one run"
EXAMPLES = """\
examples:
  largebatch train configs/mnist/seed.yaml
  largebatch train configs/mnist/seed.yaml data.root=../mnist data.download=false
  largebatch train configs/mnist/large_batch.yaml batch.global_size=4096 batch.micro_size=512
  torchrun --standalone --nproc_per_node 4 -m largebatch train configs/mnist/seed.yaml \\
      batch.global_size=240 engine.name=ddp

Writes log.out_dir/{plan.json,config.json,metrics.jsonl,summary.json,model.pt}.
Exit codes: 0 done or pre-empted with a checkpoint set saved; 2 bad input, the output folder
in use by another run or unusable; 74 a write failed mid-run (earlier sets intact)."""
#: A finished process exits without interpreter teardown (see ``largebatch.cli.main``).
HARD_EXIT = True
#: A SIGTERM/SIGUSR1 during start-up is kept: the run checkpoints at its first step and exits 0.
EARLY_SIGNALS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments: the config file and its overrides.

    Args:
        parser: the ``train`` sub-command's parser.
    """
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the config, train, and leave the process group.

    Args:
        args: the parsed ``config`` and ``overrides``.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.config import load_config
    from largebatch.dist import destroy_process_group
    from largebatch.train.build import train
    cfg = load_config(args.config, args.overrides)
    train(cfg)
    destroy_process_group()
    return 0
