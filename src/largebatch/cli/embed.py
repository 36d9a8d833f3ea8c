"""``largebatch embed MODEL INPUT --out emb.npy``: embeddings of a folder, a .rec or a .bin."""
from __future__ import annotations

import argparse

HELP = "embed every image of a folder, a .rec or a .bin with a trained face model"
EXAMPLES = """\
examples:
  largebatch embed runs/face-synthetic-tiny faces/ --out faces.npy
  largebatch embed runs/r50/model.pt data/ms1m/train.rec --out ms1m.npy --workers 8
  largebatch embed runs/r50 data/lfw.bin --out lfw.npy --batch-size 512

MODEL: a run folder, a checkpoint set, or a model.pt with the run's config.json beside it.
INPUT: a folder (<identity>/<image> and/or images directly in it), an insightface .rec (its
.idx beside it) or a .bin. Writes OUT (N x d float32, unit-norm embeddings of each image plus
its mirror, as the evaluation embeds them) and OUT with .csv for .npy: row i of the matrix is
the CSV's row i (path,identity | record,label | image,pair,side,same)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the command's arguments.

    Args:
        parser: the ``embed`` sub-command's parser.
    """
    parser.add_argument("model", metavar="CHECKPOINT_OR_MODEL",
                        help="run folder, checkpoint set or model.pt (config.json beside it)")
    parser.add_argument("input", metavar="INPUT", help="image folder, .rec or .bin")
    parser.add_argument("--out", required=True, help="the embeddings' .npy (sidecar: .csv)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader processes decoding the images (default 0: inline)")
    parser.add_argument("--progress-every", type=int, default=20, metavar="N",
                        help="off a terminal, a progress line every N batches (default 20)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to embed (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    """Load the model and the input, embed, write the matrix and its sidecar.

    Returns:
        The exit code, 0.

    Raises:
        ConfigError: bad input (the caller prints it as one line, exit 2).
    """
    from largebatch.config import ConfigError
    from largebatch.deploy.embed import embed, open_input
    from largebatch.deploy.evaluate import load_model
    from largebatch.dist import detect_launch, pick_device
    denv = detect_launch()
    if denv.world_size > 1:
        raise ConfigError(f"largebatch embed runs in one process (it is not sharded over "
                          f"ranks), not under a launcher of world size {denv.world_size}")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--progress-every", args.progress_every, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value} must be >= {low}")
    source = open_input(args.input)
    face = load_model(args.model, pick_device(args.device, denv.local_rank))
    out, sidecar, shape = embed(face, source, args.out, args.batch_size, args.workers,
                                args.progress_every)
    print(f"wrote {out} ({shape[0]} x {shape[1]} float32) and {sidecar} "
          f"(weights {face.weights})", flush=True)
    return 0
