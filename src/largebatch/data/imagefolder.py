"""``data.name=imagefolder``: ``data.root/<identity>/<image>``, one folder per identity.

Labels are the positions of the sorted folder names (``0..C-1``, torchvision's ImageFolder
convention); images are the files PIL has a decoder for (by extension, case-insensitive),
sorted by name inside each folder; hidden files and other extensions are not images. Images
are decoded in DataLoader workers (``data.num_workers``) and must be 112 x 112 aligned crops.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch

from largebatch.config import ConfigError
from largebatch.data.face_images import (ShardedImageLoader, decode_image, raise_agreed,
                                         read_image_file, training_size, warn_unused_classes)


def _image_extensions() -> frozenset[str]:
    from PIL import Image
    return frozenset(ext.lower() for ext in Image.registered_extensions())


@functools.lru_cache(maxsize=4)
def _scan(root: str, stamp: int) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    exts = _image_extensions()
    classes = sorted(e.name for e in os.scandir(root)
                     if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConfigError(f"data.root={root!r} has no identity folders (ImageFolder layout: "
                          f"data.root/<identity>/<image>)")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        files = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in exts)
        if not files:
            raise ConfigError(f"data.root={root!r}: identity folder {name!r} holds no images "
                              f"(label {label} would have no samples)")
        paths += [os.path.join(folder, f) for f in files]
        labels += [label] * len(files)
    return tuple(paths), tuple(labels), tuple(classes)


def scan(root: str | Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """``(image paths, labels, identity names)`` of an ImageFolder tree, without decoding.

    Cached per process by the root's mtime (the plan and the loaders both ask).

    Raises:
        ConfigError: no such folder, no identity folders, or an identity without images.
    """
    root = str(root)
    if not os.path.isdir(root):
        raise ConfigError(f"data.root={root!r} is not a folder (ImageFolder layout: "
                          f"data.root/<identity>/<image>)")
    return _scan(root, os.stat(root).st_mtime_ns)


class ImageFolderSource:
    """The images of an ImageFolder tree by global index (what DataLoader workers read)."""

    def __init__(self, root: str | Path, num_classes: int) -> None:
        self.paths, self.labels, self.classes = scan(root)
        if num_classes and len(self.classes) > num_classes:
            raise ConfigError(f"face.num_classes={num_classes} but data.root={str(root)!r} "
                              f"holds {len(self.classes)} identity folders")

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[torch.Tensor, int]:
        """(uint8 image (3, 112, 112), identity) of image ``index``."""
        path = self.paths[index]
        return decode_image(read_image_file(path), path), self.labels[index]


def imagefolder_size(cfg: Any, train: bool = True) -> int:
    """Image files under data.root (or data.num_samples without the tree; capped by
    data.subset), or the first .bin's pairs; lists the folders, never decodes."""
    if not train:
        from largebatch.data.bin_pairs import val_pair_count
        return val_pair_count(cfg)
    return training_size(cfg, os.path.isdir(cfg.data.root),
                         lambda: len(scan(cfg.data.root)[0]), f"data.root={cfg.data.root!r}")


class ImageFolderLoader(ShardedImageLoader):
    """``data.name=imagefolder``: one rank's training batches of the tree in data.root."""

    def __init__(self, cfg: Any, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device) -> None:
        source = ImageFolderSource(cfg.data.root, cfg.face.num_classes)
        n = training_size(cfg, True, lambda: len(source), f"data.root={cfg.data.root!r}")
        if rank == 0:
            warn_unused_classes(cfg.face.num_classes, len(source.classes),
                                f"data.root={cfg.data.root!r}")
        super().__init__(source, batch_size, rank, world, seed, device,
                         num_workers=cfg.data.num_workers, drop_last=cfg.data.drop_last, n=n)


def _prepare(cfg: Any, denv: Any) -> None:
    """Check the tree on every rank (run.py passes the data section; the whole Config also
    checks face.val_targets)."""
    from largebatch.data.bin_pairs import missing_val_target
    data = getattr(cfg, "data", cfg)
    error = None
    if not os.path.isdir(data.root):
        error = (f"data.root={data.root!r} is not a folder (ImageFolder layout: "
                 f"data.root/<identity>/<image>)")
    raise_agreed(error or (missing_val_target(cfg) if hasattr(cfg, "face") else None), denv)


def imagefolder_spec():  # -> DatasetSpec (imported lazily by the registry)
    """The registry entry of ``data.name=imagefolder``."""
    from largebatch.data.bin_pairs import target_loaders
    from largebatch.data.registry import DatasetSpec
    return DatasetSpec(size=imagefolder_size, prepare=_prepare, train_loader=ImageFolderLoader,
                       eval_loader=target_loaders, full_config=True)
