"""The ``largebatch`` command: its parser, built from one registry of sub-commands, and ``main``.

Each sub-command is a module in ``largebatch.cli`` (``COMMANDS``: name -> module) with ``HELP``,
optional ``EXAMPLES``, ``add_arguments(parser)``, ``run(args) -> exit code`` and optional
``HARD_EXIT`` and ``EARLY_SIGNALS`` (a stop signal during start-up is kept for the trainer,
``largebatch.signals``; other commands get the default handlers back). Modules stay light to
import (heavy imports go inside ``run``), so ``--help`` and ``keys`` are fast. Bad input (a ``ConfigError``) is one line on stderr and exit code 2; a
failed write (a full disk, a read-only folder) is one line and exit 74.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Optional, Sequence

from largebatch.config import ConfigError
from largebatch.errors import STORAGE_EXIT_CODE
from largebatch.signals import catch_early, release_early

DESCRIPTION = ("Train with one global batch on 1..N processes (DDP, DeepSpeed), plan the batch "
               "arithmetic, run the MNIST batch-size study, list the config keys.")
EXAMPLES = """\
examples:
  largebatch train configs/mnist/seed.yaml                       # one process, CPU or one GPU
  largebatch train configs/mnist/mlp.yaml optim.lr=0.1 train.epochs=2
  torchrun --standalone --nproc_per_node 2 -m largebatch train configs/mnist/seed.yaml \\
      batch.global_size=120 engine.name=ddp                      # 2 ranks, one global batch
  largebatch plan configs/mnist/seed.yaml batch.global_size=4096 --world-size 4
  largebatch study configs/mnist/study.yaml study.quick=true     # the batch-size study, ~1 min
  largebatch keys optim                                          # what every optim.* key means

Bad input (unknown key, wrong type, inconsistent batch) is one line on stderr and exit code 2.
MNIST is read from data.root ($LARGEBATCH_DATA_ROOT, else data/), downloaded there if missing."""

#: Every sub-command, in the order ``largebatch --help`` lists them: name -> module with
#: ``HELP``, optional ``EXAMPLES``, ``add_arguments(parser)``, ``run(args) -> exit code`` and
#: optional ``HARD_EXIT`` (a real process exits hard once flushed, see :func:`_hard_exit`).
COMMANDS: dict[str, str] = {
    "train": "largebatch.cli.train",
    "plan": "largebatch.cli.plan",
    "study": "largebatch.cli.study",
    "status": "largebatch.cli.status",
    "keys": "largebatch.cli.keys",
    "lr-find": "largebatch.cli.lr_find",
    "plot": "largebatch.cli.plot",
    "noise-scale": "largebatch.cli.noise_scale",
    "convert": "largebatch.cli.convert",
    "synth-faces": "largebatch.cli.synth_faces",
    "eval": "largebatch.cli.eval",
    "embed": "largebatch.cli.embed",
    "make-bin": "largebatch.cli.make_bin",
    "export": "largebatch.cli.export",
}


def _parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of ``COMMANDS``.

    Returns:
        The parser; each sub-command's namespace carries ``run_command`` (its ``run``) and
        ``hard_exit`` (its ``HARD_EXIT``, False where it has none).
    """
    p = argparse.ArgumentParser(prog="largebatch", description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(module)
        cmd = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                             epilog=getattr(mod, "EXAMPLES", None),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(cmd)
        cmd.set_defaults(run_command=mod.run, hard_exit=getattr(mod, "HARD_EXIT", False),
                         early_signals=getattr(mod, "EARLY_SIGNALS", False))
    return p


#: An error line names the key, the file and the numbers: never more than this many
#: characters of it are printed (a message that quotes hostile input could be huge).
MAX_ERROR_CHARS = 500


def _capped(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS`` characters, saying how much was left out."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters)"


def _all_ranks_printed() -> None:
    """Wait until every rank has printed an error that all ranks raised (a failed download).

    torchrun stops the other workers as soon as one exits with an error, so without this a
    rank that is a little behind would be killed before it says why.
    """
    import torch.distributed as torch_dist
    if torch_dist.is_initialized():
        try:
            torch_dist.barrier()
        except RuntimeError:  # a rank is gone after all: nothing left to wait for
            pass


#: The errors of a write that failed for want of room or permission on the storage: the
#: run stops in one line with exit ``STORAGE_EXIT_CODE`` instead of a traceback.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _storage_line(exc: OSError) -> str:
    """The one line of a failed write: the file and the reason."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"a write failed: {exc.strerror or exc}{where}; earlier checkpoint sets are intact"


def _hard_exit(code: int) -> None:
    """Exit without running interpreter teardown once everything is flushed.

    Distributed runs (gloo/nccl/DeepSpeed threads) sometimes abort in C++ static destructors
    *after* a successful run ("terminate called without an active exception"), turning a
    finished run into a failed launch. Flushing and calling ``os._exit`` skips that teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _adopt_local_rank(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local-rank N`` (what torch.distributed.launch and the
    deepspeed launcher append for scripts that read it, arcface_torch's among them): largebatch
    reads ``LOCAL_RANK`` from the environment, and takes the argument's value only when the
    launcher set no variable."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``largebatch`` command and ``python -m largebatch``.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv`` (a real process,
            which exits hard after a command with ``HARD_EXIT``).

    Raises:
        SystemExit: always, with the command's exit code (2 for bad input, 74 for a failed
            write, 130 on Ctrl-C).
    """
    real_process = argv is None
    if real_process:  # (the console script comes here first) a stop signal is remembered
        catch_early()
    parser = _parser()
    argv = _adopt_local_rank(list(sys.argv[1:] if argv is None else argv))
    # Options may come after the overrides (`plan cfg.yaml a=1 --json`): collect leftovers.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    # A real process (not a test calling main([...])) that trained exits hard once flushed.
    hard = real_process and args.hard_exit
    if not args.early_signals:  # only a training run turns a stop signal into a checkpoint
        release_early()
    try:
        code = args.run_command(args)
    except ConfigError as exc:
        # The whole line in one write: ranks share the launcher's stderr pipe, and print()
        # writes the text and the newline separately, so two ranks' lines could interleave.
        sys.stderr.write(f"largebatch: error: {_capped(str(exc))}\n")
        sys.stderr.flush()
        code = exc.exit_code  # 2: bad input; 74: a write failed (StorageError)
        if getattr(exc, "all_ranks", False):
            _all_ranks_printed()
    except BrokenPipeError:  # `largebatch keys | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        # A write no StorageError names (e.g. a metrics line on a full disk): one line too.
        sys.stderr.write(f"largebatch: error: {_capped(_storage_line(exc))}\n")
        sys.stderr.flush()
        code = STORAGE_EXIT_CODE
    except KeyboardInterrupt:
        print("largebatch: interrupted", file=sys.stderr)
        code = 130
    if hard:
        _hard_exit(code)
    sys.exit(code)
