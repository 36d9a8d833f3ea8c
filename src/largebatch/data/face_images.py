"""Shared by the real-data face readers (RecordIO, ImageFolder, ``.bin`` pairs).

* ``decode_image``: encoded bytes -> uint8 ``(3, 112, 112)`` RGB, or a one-line ConfigError
  naming where the bytes came from (never a silently wrong image).
* ``normalize``: insightface's ``ToTensor`` + ``Normalize(0.5, 0.5)``, as the same float ops
  (``x / 255``, ``- 0.5``, ``/ 0.5``), so batches equal torchvision's bit for bit.
* ``flip_mask``: insightface trains with ``RandomHorizontalFlip``; here a sample's flip is a
  hash of ``(seed, epoch, index)``, so it does not depend on the rank layout or the workers.
* ``ShardedImageLoader``: the rank's ``shard_indices`` permutation (the global order every
  other dataset uses), decoded in torch DataLoader workers, normalised on the device.
"""
from __future__ import annotations

import io
import math
import os
import sys
import warnings
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from largebatch.config import ConfigError
from largebatch.data.loaders import Batch, shard_indices

#: Side of the aligned face crops insightface ships (and its backbones take).
IMAGE_SIZE = 112
#: The largest encoded image read: a 112 x 112 crop is a few KiB as JPEG, 37 KiB as BMP.
MAX_IMAGE_BYTES = 4 << 20
#: PIL's decompression-bomb limit, set explicitly (its default is 89M pixels): PIL refuses
#: a header above twice this in ``Image.open``; below it, the size is checked before decoding.
DECODE_PIXEL_LIMIT = 1 << 24


class PairBatches:
    """Batches of one rank's verification pairs: ``x (n, 2, 3, H, W)``, ``y (n, 2) = [global
    pair index, same 0/1]``; subclasses set ``index``, ``images``, ``same``, ``batch_size``,
    ``device`` and may override ``prepare`` (e.g. normalise uint8 images on the device)."""

    index: torch.Tensor
    images: torch.Tensor
    same: torch.Tensor
    batch_size: int
    device: Any

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The images of a batch as the model takes them (already on the device)."""
        return x

    def set_epoch(self, epoch: int) -> None:
        """The pairs are fixed."""

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for s in range(0, len(self.index), self.batch_size):
            e = s + self.batch_size
            y = torch.stack([self.index[s:e], self.same[s:e]], 1)
            yield self.prepare(self.images[s:e].to(self.device)), y.to(self.device)


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces collapsed (error lines stay one line)."""
    return " ".join(str(text).split())


def _pil_image() -> Any:
    """PIL's ``Image`` with the decompression-bomb limit at ``DECODE_PIXEL_LIMIT`` (or lower)."""
    from PIL import Image
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS > DECODE_PIXEL_LIMIT:
        Image.MAX_IMAGE_PIXELS = DECODE_PIXEL_LIMIT
    return Image


def read_image_file(path: str) -> bytes:
    """An image file's bytes; one over ``MAX_IMAGE_BYTES`` is refused from its size, unread
    (a sparse "JPEG" of GiB costs no disk and would cost its size in memory).

    Raises:
        ConfigError: the file cannot be read or is too large, naming it.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_IMAGE_BYTES:
                raise ConfigError(f"{path}: {size} bytes, over the {MAX_IMAGE_BYTES}-byte "
                                  f"limit on an image file (a {IMAGE_SIZE} x {IMAGE_SIZE} crop "
                                  f"takes KiB)")
            return f.read(MAX_IMAGE_BYTES + 1)  # decode_image refuses it if it grew meanwhile
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """Decode one image (JPEG or any PIL-readable format) to uint8 RGB ``(3, 112, 112)``.

    Bounded whatever the bytes say: more than ``MAX_IMAGE_BYTES`` is refused unread, and the
    size the header states is checked before the pixels are decoded (a small file claiming
    9000 x 9000 pixels is refused from its header).

    Args:
        data: the encoded bytes.
        where: what the error names (file, record), e.g. ``"train.rec: record 17"``.

    Raises:
        ConfigError: the bytes are not a readable image, or it is not 112 x 112.
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise ConfigError(f"{where}: {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit "
                          f"on an encoded image (a {IMAGE_SIZE} x {IMAGE_SIZE} crop takes KiB)")
    Image = _pil_image()
    size = (IMAGE_SIZE, IMAGE_SIZE)
    try:
        with warnings.catch_warnings():  # between the limit and twice it: checked below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            size = img.size  # from the header: nothing is decoded yet
            if size == (IMAGE_SIZE, IMAGE_SIZE):
                img.load()  # a truncated JPEG raises here instead of decoding grey pixels
                rgb = np.asarray(img.convert("RGB"))
                size = (rgb.shape[1], rgb.shape[0])
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... per plugin
        raise ConfigError(one_line(f"{where}: not a readable image "
                                   f"({type(exc).__name__}: {exc})")) from None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(f"{where}: image is {size[0]}x{size[1]}, expected "
                          f"{IMAGE_SIZE}x{IMAGE_SIZE} (aligned face crops, as insightface "
                          f"ships them)")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 ``(x / 255 - 0.5) / 0.5`` (insightface's training transform)."""
    return x.float().div_(255).sub_(0.5).div_(0.5)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a cheap, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """Whether global sample ``index`` is mirrored in ``epoch`` (p = 1/2, layout-independent)."""
    key = _mix64(_mix64(np.array([seed % 2 ** 64], np.uint64)) ^ np.uint64(epoch % 2 ** 64))
    h = _mix64(index.numpy().astype(np.uint64) ^ key)
    return torch.from_numpy((h >> np.uint64(63)).astype(bool))


class ImageSource(Protocol):
    """A dataset of labelled images read by global index (pickled into DataLoader workers)."""

    def __len__(self) -> int: ...
    def read(self, index: int) -> tuple[torch.Tensor, int]: ...


class _Failure:
    """A worker's ConfigError, carried as a value: torch would re-raise it with a traceback
    in its message, and a user error must stay one line."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Items(torch.utils.data.Dataset):
    """``dataset[(index, flip)]`` -> (uint8 image, label), decoded in the worker."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, bool]) -> Any:
        index, flip = item
        try:
            image, label = self.source.read(index)
        except ConfigError as exc:
            return _Failure(str(exc))
        return (image.flip(-1) if flip else image), label


def _collate(items: list) -> Any:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return (torch.stack([im for im, _ in items]),
            torch.tensor([label for _, label in items], dtype=torch.int64))


class _EpochBatches:
    """The batch sampler: this rank's shard of the epoch's permutation, cut into batches.

    It lives in the main process (DataLoader iterates it there), so ``set_epoch`` reaches it
    even with persistent workers.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world: int, seed: int,
                 drop_last: bool, flip: bool) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.drop_last, self.flip, self.epoch = seed, drop_last, flip, 0

    def indices(self) -> torch.Tensor:
        return shard_indices(self.n, self.rank, self.world, self.seed, self.epoch, True,
                             self.drop_last)

    def __len__(self) -> int:
        n = len(self.indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        idx = self.indices()
        flips = (flip_mask(self.seed, self.epoch, idx) if self.flip
                 else torch.zeros(len(idx), dtype=torch.bool)).tolist()
        items = list(zip(idx.tolist(), flips))
        for b in range(len(self)):
            yield items[b * self.batch_size:(b + 1) * self.batch_size]


class ShardedImageLoader:
    """One rank's training micro-batches of an image source (the BatchLoader protocol).

    Batches are ``(x float32 (n, 3, 112, 112), y int64 (n,))``; the uint8 images travel to
    the device and are normalised there (a quarter of the bytes of float32).
    """

    def __init__(self, source: ImageSource, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device, num_workers: int = 0, drop_last: bool = False,
                 n: int | None = None, flip: bool = True) -> None:
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0")
        self.n = len(source) if n is None else min(n, len(source))
        self.device = torch.device(device)
        self.batches = _EpochBatches(self.n, batch_size, rank, world, seed, drop_last, flip)
        # Own generator: the DataLoader draws its workers' base seed from it, so building or
        # iterating this loader never advances the global torch RNG (dropout, resume).
        self.generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            _Items(source), batch_sampler=self.batches, num_workers=num_workers,
            collate_fn=_collate, persistent_workers=num_workers > 0,
            pin_memory=self.device.type == "cuda", generator=self.generator)

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation and the flips of ``epoch`` (same on all ranks)."""
        self.batches.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's global sample indices of the current epoch, in batch order."""
        return self.batches.indices()

    def __len__(self) -> int:
        return len(self.batches)

    def _stop_workers(self) -> None:
        """End the persistent workers now: left to the garbage collector (the error's
        traceback keeps this loader alive), their shutdown waits out torch's 5 s join."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            self.loader._iterator = None

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if isinstance(batch, _Failure):
                self._stop_workers()
                raise ConfigError(batch.message)
            x, y = batch
            yield (normalize(x.to(self.device, non_blocking=True)),
                   y.to(self.device, non_blocking=True))


def raise_agreed(error: str | None, denv: Any) -> None:
    """Raise ``error`` (one rank's missing file) on every rank, so none waits in a collective
    for a rank that has already exited."""
    from largebatch.data.mnist import _agree
    error = _agree(error, denv)
    if error:
        exc = ConfigError(error)
        exc.all_ranks = True  # every rank raises it: the CLI lets all print before exiting
        raise exc


def warn_unused_classes(num_classes: int, identities: int, where: str) -> None:
    """A head with more classes than the data has identities trains rows that never see a
    sample (they only decay): legal, but usually a wrong ``face.num_classes``; one line."""
    if identities and num_classes > identities:
        print(f"largebatch: warning: face.num_classes={num_classes} but {where} holds "
              f"{identities} identities: {num_classes - identities} class rows of the head will "
              f"never see a sample (set face.num_classes={identities})", file=sys.stderr,
              flush=True)


def training_size(cfg: Any, files_present: bool, count: Any, what: str) -> int:
    """The training set's size for the plan: counted from the files when they are there
    (``count()``, which must not decode), else ``data.num_samples``; capped by data.subset.

    Raises:
        ConfigError: no files and no data.num_samples, or the two disagree.
    """
    stated = getattr(cfg.data, "num_samples", 0)
    if files_present:
        n = int(count())
        if stated and stated != n:
            raise ConfigError(f"data.num_samples={stated} but {what} holds {n} images")
    elif stated:
        n = stated
    else:
        count()  # raises the reader's one-line error naming the missing file
        raise ConfigError(f"{what} not found and data.num_samples=0")  # pragma: no cover
    return min(n, cfg.data.subset) if cfg.data.subset else n
