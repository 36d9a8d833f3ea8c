"""Arguments several sub-commands share: the config file and its dotted ``key=value`` overrides."""
from __future__ import annotations

import argparse

#: Help text of the ``overrides`` argument of ``train``, ``plan``, ``study`` and ``status``.
OVERRIDES = "dotted key=value overrides, applied over the file (see `largebatch keys`)"


def add_config_arguments(parser: argparse.ArgumentParser,
                         config_help: str = "YAML config file") -> None:
    """Add the positional ``config`` file and the ``overrides`` after it.

    Args:
        parser: the sub-command's parser.
        config_help: help text of the ``config`` argument.
    """
    parser.add_argument("config", help=config_help)
    parser.add_argument("overrides", nargs="*", help=OVERRIDES)
