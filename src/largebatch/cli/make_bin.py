"""``largebatch make-bin PAIRS_TXT OUT.bin``: an insightface verification set from a pairs list."""
from __future__ import annotations

import argparse

HELP = "write an insightface .bin verification set from a pairs list"
EXAMPLES = """\
examples:
  largebatch make-bin faces/pairs.txt data/myset.bin
  largebatch make-bin faces/pairs.txt data/myset.bin --encode jpeg --protocol 2

PAIRS_TXT: one pair per line, 'path1 path2 same' (same: 1/0, true/false, yes/no), paths
relative to the pairs file, 112x112 aligned crops; '#' lines are comments. JPEG and PNG files
are stored byte for byte (--encode keep), other formats as PNG; the result is read back
through the restricted unpickler before the command ends. Use it as face.val_targets or with
`largebatch eval --bin`."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments.

    Args:
        parser: the ``make-bin`` sub-command's parser.
    """
    parser.add_argument("pairs", metavar="PAIRS_TXT", help="the pairs list")
    parser.add_argument("out", metavar="OUT.bin", help="the verification set to write")
    parser.add_argument("--encode", default="keep", choices=("keep", "jpeg", "png"),
                        help="keep JPEG/PNG bytes (default), or re-encode all as jpeg|png")
    parser.add_argument("--protocol", type=int, default=4, choices=(2, 3, 4, 5),
                        help="pickle protocol (default 4; 2 for Python 2 readers)")


def run(args: argparse.Namespace) -> int:
    """Read the pairs, check and encode the images, write and re-read the set.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.data.bin_write import make_bin
    facts = make_bin(args.pairs, args.out, args.encode, args.protocol)
    print(f"wrote {args.out}: {facts['pairs']} pairs ({facts['same']} same, "
          f"{facts['different']} different), {facts['bytes']} bytes", flush=True)
    return 0
