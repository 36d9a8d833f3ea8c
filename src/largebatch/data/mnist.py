"""MNIST through torchvision, as raw uint8 tensors (the in-memory path) or a Dataset.

``prepare_data`` runs once per run before any loader: one process per filesystem downloads, the
other ranks wait for its outcome, so ranks never write the same files at once.
"""
from __future__ import annotations

import contextlib
import io
import math
import socket
import struct
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as torch_dist

from largebatch.config import ConfigError, DataConfig
from largebatch.dist import DistEnv

MEAN, STD = 0.1307, 0.3081
SIZES = {"train": 60000, "test": 10000}
#: Digits 0..9; every MNIST model outputs one log-probability per class.
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
# A stalled mirror (accepts the connection, never answers) must fail, not hang every rank.
DOWNLOAD_TIMEOUT_S = 60.0


def _missing(root: str) -> ConfigError:
    where = Path(root).resolve() / "MNIST" / "raw"
    return ConfigError(f"data.root={root!r}: MNIST not found and not downloadable; put "
                       f"train-images-idx3-ubyte etc. (or their .gz) in {where} or set "
                       f"data.download=true with network access")


def _download_failed(cfg: DataConfig, exc: BaseException) -> ConfigError:
    where = Path(cfg.root).resolve() / "MNIST" / "raw"
    reason = " ".join(str(exc).split()) or type(exc).__name__  # torchvision's is multi-line
    return ConfigError(f"data.root={cfg.root!r}: MNIST download failed ({reason}); set "
                       f"data.mirror (or $LARGEBATCH_MNIST_MIRROR) to a reachable mirror, or "
                       f"put the files in {where} and set data.download=false")


def _mnist_class(mirror: str) -> type:
    """torchvision's MNIST, or a subclass that downloads from ``mirror`` only."""
    from torchvision.datasets import MNIST
    if not mirror:
        return MNIST
    # Same class name: torchvision derives the folder (root/MNIST/raw) from it.
    return type("MNIST", (MNIST,), {"mirrors": [mirror.rstrip("/") + "/"]})


def _idx_shape(path: Path, dims: int) -> tuple[int, ...]:
    """The shape an idx file (``magic | dims x uint32 | uint8 data``, big-endian) states,
    checked against the file's size before anything but the header is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4 + 4 * dims)
    if len(head) < 4 + 4 * dims:
        raise ConfigError(f"{path}: {size} bytes, shorter than the {4 + 4 * dims}-byte idx "
                          f"header")
    magic, *shape = struct.unpack(f">I{dims}I", head)
    if magic != 0x0800 | dims:
        raise ConfigError(f"{path}: magic 0x{magic:08x}, expected 0x{0x0800 | dims:08x} (idx "
                          f"uint8 with {dims} dimension{'s' * (dims > 1)}, MNIST's format)")
    expected = 4 + 4 * dims + math.prod(shape)
    if size != expected:
        raise ConfigError(f"{path}: the header says {' x '.join(map(str, shape))} bytes of data "
                          f"({expected} bytes with the header) but the file has {size} bytes")
    return tuple(shape)


def split_files(root: str, train: bool) -> tuple[Path, Path]:
    """The raw (images, labels) files of a split in torchvision's layout."""
    raw, prefix = Path(root) / "MNIST" / "raw", "train" if train else "t10k"
    return raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"


def check_split(root: str, train: bool) -> Optional[int]:
    """The images of a split's raw files, from their headers (checked against the files'
    sizes, 28 x 28 images, as many labels as images); None when the files are not there.

    Raises:
        ConfigError: a header that does not match its file, or the two files disagree.
    """
    images, labels = split_files(root, train)
    if not (images.is_file() and labels.is_file()):
        return None
    n, *shape = _idx_shape(images, 3)
    (n_labels,) = _idx_shape(labels, 1)
    if tuple(shape) != IMAGE_SHAPE:
        raise ConfigError(f"{images}: images are {shape[0]}x{shape[1]}, MNIST's are "
                          f"{IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}")
    if n_labels != n:
        raise ConfigError(f"{labels}: {n_labels} labels for the {n} images of {images.name}: "
                          f"a split's two files hold one label per image")
    return n


def _check_labels(ds, cfg: DataConfig, train: bool) -> None:
    """Every label is one of the models' ``NUM_CLASSES`` outputs (one pass, at load)."""
    targets = ds.targets
    if len(targets) != len(ds.data):
        raise ConfigError(f"{split_files(cfg.root, train)[1]}: {len(targets)} labels for "
                          f"{len(ds.data)} images")
    bad = ((targets < 0) | (targets >= NUM_CLASSES)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ConfigError(f"{split_files(cfg.root, train)[1]}: label {int(targets[i])} of "
                          f"sample {i} is outside MNIST's {NUM_CLASSES} classes "
                          f"(0..{NUM_CLASSES - 1}, the models' outputs)")


def mnist_dataset(cfg: DataConfig, train: bool, transform=None):
    """The torchvision dataset; a one-line ConfigError when it is missing or malformed (the
    files' headers are checked against their sizes before torchvision reads them)."""
    check_split(cfg.root, train)
    try:
        ds = _mnist_class(cfg.mirror)(root=cfg.root, train=train, download=cfg.download,
                                      transform=transform)
    except (RuntimeError, OSError, ValueError) as exc:  # "Dataset not found" / URL errors
        if cfg.download:
            raise _download_failed(cfg, exc) from exc
        raise _missing(cfg.root) from exc
    _check_labels(ds, cfg, train)
    return ds


def load_mnist_tensors(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 images (N, 28, 28), int64 labels (N,)), subset applied."""
    ds = mnist_dataset(cfg, train)
    images, labels = ds.data, ds.targets
    limit = cfg.subset if train else cfg.test_subset
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images.contiguous(), labels.contiguous()


def mnist_files(cfg: DataConfig) -> list[Path]:
    """The raw files of the split (what the ranks compare before training)."""
    return sorted((Path(cfg.root) / "MNIST" / "raw").glob("*-ubyte"))


def mnist_size(cfg: DataConfig, train: bool = True) -> int:
    """Number of samples in the split after ``subset``: the files' headers when they are
    there (checked, see ``check_split``), else MNIST's size — never the data itself."""
    n = check_split(cfg.root, train)
    n = SIZES["train" if train else "test"] if n is None else n
    limit = cfg.subset if train else cfg.test_subset
    return min(n, limit) if limit else n


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), bit-identical to ToTensor()+Normalize."""
    return images.unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen has no timeout of its own; it uses the process default.
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _fetch(cfg: DataConfig) -> Optional[str]:
    """Check (and download when allowed) the files here; the error line, or None when fine."""
    chatter = io.StringIO()
    try:
        # torchvision prints "Downloading ..." lines: shown on success, folded into the
        # one-line error on failure.
        with _socket_timeout(DOWNLOAD_TIMEOUT_S), contextlib.redirect_stdout(chatter):
            mnist_dataset(cfg, train=False)  # downloads all four files; loads the small split
    except ConfigError as exc:
        return str(exc)
    sys.stdout.write(chatter.getvalue())
    return None


def prepare_data(cfg: DataConfig, denv: DistEnv) -> None:
    """Make sure MNIST is in ``cfg.root`` on every node before any rank reads it.

    One process per filesystem writes: global rank 0 checks the files and downloads what is
    missing (when ``data.download`` allows it) while all other ranks wait; then the local rank
    0 of every other node does the same, which finds the files already there when ``data.root``
    is shared by the nodes and fills a node-local root otherwise. Each turn ends in one
    collective that carries its outcome, so a failed download is the same one-line ConfigError
    on every rank, never a traceback on one rank and a hang on the others. Call it once the
    process group exists (``run.setup_runtime``); a single, unlaunched process just checks.

    Args:
        cfg: the data section (root, download, mirror).
        denv: where this process sits in the job.

    Raises:
        ConfigError: the files are missing and could not be downloaded (on every rank).
    """
    for my_turn in (denv.rank == 0, denv.local_rank == 0 and denv.rank != 0):
        error = _agree(_fetch(cfg) if my_turn else None, denv)
        if error:
            exc = ConfigError(error)
            exc.all_ranks = True  # every rank raises it: the CLI lets all print before exiting
            raise exc


def _agree(error: Optional[str], denv: DistEnv) -> Optional[str]:
    """The first rank's error line on every rank (a collective when there is a group)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return error
    outcomes: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(outcomes, (denv.rank, error))
    failed = [(rank, text) for rank, text in outcomes if text]
    if failed and error is None:
        rank, text = failed[0]
        return f"{text} (reported by rank {rank}, which fetches the data for its node)"
    return error
