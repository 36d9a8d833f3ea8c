"""``largebatch synth-faces OUT``: synthetic identities as real files, to walk the real-data
path without a download (ImageFolder tree + held-out pairs list at 112 x 112)."""
from __future__ import annotations

import argparse
import sys

HELP = "write synthetic identities as an ImageFolder tree and a pairs list (112x112 PNG)"
EXAMPLES = """\
examples:
  largebatch synth-faces walk/faces                 # walk/faces/train/<id>/*.png, pairs.txt
  largebatch convert walk/faces/train walk/rec      # -> insightface RecordIO
  largebatch make-bin walk/faces/pairs.txt walk/faces/synth.bin

docs/FACE.md, "From training to deployment", walks the whole path."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The output folder and the sizes of the set."""
    parser.add_argument("out", help="output folder (train/, heldout/, pairs.txt)")
    parser.add_argument("--identities", type=int, default=40, help="training identities")
    parser.add_argument("--images", type=int, default=8, help="images per training identity")
    parser.add_argument("--eval-identities", type=int, default=20,
                        help="held-out identities of the verification pairs")
    parser.add_argument("--pairs", type=int, default=200, help="verification pairs")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    """Write the files, a progress line every tenth."""
    from largebatch.data.faces_write import write_synthetic_faces
    shown = [0]

    def progress(done: int, total: int) -> None:
        if 10 * done // total > shown[0] or done == total:
            shown[0] = 10 * done // total
            print(f"synth-faces: {done}/{total} images", file=sys.stderr, flush=True)
    info = write_synthetic_faces(args.out, args.identities, args.images, args.eval_identities,
                                 args.pairs, args.seed, progress)
    print(f"synth-faces: {info['train_images']} training images of {info['identities']} "
          f"identities in {info['train']}, {info['pairs']} held-out pairs in "
          f"{info['pairs_txt']}")
    return 0
