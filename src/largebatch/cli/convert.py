"""``largebatch convert IMAGE_FOLDER OUT_DIR``: an ImageFolder tree to insightface's RecordIO.

One folder per identity (``IMAGE_FOLDER/<identity>/<image>``), 112 x 112 aligned face crops,
to ``OUT_DIR/train.rec`` + ``train.idx`` as insightface ships MS1MV3 or Glint360K (header
record, one record per image, one per identity), readable by ``data.name=recordio`` and by
insightface's own ``MXFaceDataset``. JPEG files are copied byte for byte, others re-encoded.
"""
from __future__ import annotations

import argparse
import sys
import time

HELP = "convert an ImageFolder tree (one folder per identity) to insightface RecordIO"
EXAMPLES = """\
examples:
  largebatch convert faces/ data/my_faces            # -> data/my_faces/train.rec + train.idx
  largebatch train configs/face/ms1mv3_r50.yaml data.name=recordio data.root=data/my_faces

Every image is decoded once to check it; a bad or wrongly sized file is one line naming it
(exit 2) and the partial output is removed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The source tree, the destination folder, the JPEG quality of re-encoded images."""
    parser.add_argument("src", help="ImageFolder tree: SRC/<identity>/<image>")
    parser.add_argument("dst", help="folder for train.rec and train.idx")
    parser.add_argument("--quality", type=int, default=95,
                        help="JPEG quality for images that are not JPEG already (default 95)")


class _Progress:
    """A line every 10% (and at the end): plain text, fit for a log file."""

    def __init__(self) -> None:
        self.start, self.shown = time.monotonic(), 0

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // max(1, total)
        if tenth > self.shown or done == total:
            self.shown = tenth
            rate = done / max(1e-9, time.monotonic() - self.start)
            print(f"convert: {done}/{total} images ({100 * done // max(1, total)}%), "
                  f"{rate:.0f} images/s", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Convert; on a bad image remove the partial files and raise its one-line error."""
    from pathlib import Path

    from largebatch.data.recordio import IDX_NAME, REC_NAME
    from largebatch.data.recordio_write import imagefolder_to_rec
    from largebatch.errors import ConfigError

    if not 1 <= args.quality <= 100:
        raise ConfigError(f"--quality={args.quality} must be in [1, 100]")
    dst = Path(args.dst)
    existing = [dst / n for n in (REC_NAME, IDX_NAME) if (dst / n).exists()]
    if existing:
        raise ConfigError(f"{existing[0]} exists: convert into an empty folder")
    progress = _Progress()
    try:
        n = imagefolder_to_rec(args.src, dst, args.quality, progress)
    except BaseException:
        for name in (REC_NAME, IDX_NAME):
            (dst / name).unlink(missing_ok=True)
        raise
    progress(n, n)
    print(f"convert: {n} images -> {dst / REC_NAME}, {dst / IDX_NAME}")
    return 0
