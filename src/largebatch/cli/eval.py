"""``largebatch eval MODEL --bin a.bin b.bin ...``: score a trained face model on insightface
verification sets (one process, or every rank of a ``torchrun`` embedding its share)."""
from __future__ import annotations

import argparse
from fractions import Fraction

HELP = "score a face model on insightface .bin verification sets"
EXAMPLES = """\
examples:
  largebatch eval runs/face-synthetic-tiny --bin data/lfw.bin data/cfp_fp.bin data/agedb_30.bin
  largebatch eval runs/r50/checkpoints/step-010000 --bin lfw.bin --far 1e-3 1e-4 --out eval/
  torchrun --standalone --nproc_per_node 8 -m largebatch eval runs/r50/model.pt --bin lfw.bin

MODEL: a run folder (its model.pt, else its newest checkpoint set), a checkpoint set, or a
model.pt with the run's config.json beside it. Prints one line per set and writes
OUT/eval.json (everything: accuracy +- std, per-fold accuracies and thresholds, TAR@FAR,
val@FAR, notes) and OUT/NAME_roc.csv|png. TAR@FAR and val@FAR are null where the set has
fewer than 1/FAR impostor pairs (the JSON's notes say so)."""
#: A finished process exits without interpreter teardown (see ``largebatch.cli.main``).
HARD_EXIT = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments.

    Args:
        parser: the ``eval`` sub-command's parser.
    """
    parser.add_argument("model", metavar="CHECKPOINT_OR_MODEL",
                        help="run folder, checkpoint set or model.pt (config.json beside it)")
    parser.add_argument("--bin", nargs="+", required=True, metavar="BIN",
                        help="insightface verification sets (lfw.bin, cfp_fp.bin, ...)")
    parser.add_argument("--out", default="eval", help="folder for eval.json and the ROC "
                        "curves (default: ./eval)")
    parser.add_argument("--far", nargs="+", default=["1e-3", "1e-4"], metavar="FAR",
                        help="false accept rates of TAR@FAR and val@FAR (default 1e-3 1e-4)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="pairs per forward pass and rank (default 256, as in training)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to embed (default: cuda:LOCAL_RANK if available)")


def check_fars(fars: list[str]) -> list[str]:
    """The ``--far`` values as written, each a decimal in (0, 1).

    Raises:
        ConfigError: a value that is not a number in (0, 1), or one given twice.
    """
    from largebatch.config import ConfigError
    for far in fars:
        try:
            ok = 0 < Fraction(far) < 1
        except (ValueError, ZeroDivisionError):
            ok = False
        if not ok:
            raise ConfigError(f"--far {far!r} is not a false accept rate in (0, 1)")
    if len(set(fars)) != len(fars):
        raise ConfigError(f"--far {' '.join(fars)}: a value is given twice")
    return list(fars)


def run(args: argparse.Namespace) -> int:
    """Load the model, embed every set (each rank its share), score, write (rank 0).

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from pathlib import Path

    from largebatch.config import ConfigError
    from largebatch.deploy.evaluate import eval_engine, evaluate, load_model, set_names
    from largebatch.dist import (check_launch, destroy_process_group, detect_launch,
                                 init_process_group, pick_device)
    from largebatch.face.report import summary_line
    fars = check_fars(args.far)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be >= 1")
    bins = set_names(args.bin)
    denv = detect_launch()
    check_launch(denv)
    device = pick_device(args.device, denv.local_rank)
    face = load_model(args.model, device)
    init_process_group(denv, device, face.cfg.engine.backend)
    engine = eval_engine(face.cfg, denv, device)
    doc = evaluate(face, bins, engine, Path(args.out), fars, args.batch_size)
    if doc is not None:
        for name, report in doc["sets"].items():
            print(summary_line(name, report), flush=True)
        print(f"wrote {Path(args.out) / 'eval.json'} (weights {face.weights})", flush=True)
    engine.barrier()  # no rank leaves while rank 0 still writes
    destroy_process_group()
    return 0
