"""MNIST through torchvision, as raw uint8 tensors (the in-memory path) or a Dataset."""
from __future__ import annotations

from pathlib import Path

import torch

from largebatch.config import ConfigError, DataConfig

MEAN, STD = 0.1307, 0.3081
SIZES = {"train": 60000, "test": 10000}


def _missing(root: str) -> ConfigError:
    where = Path(root).resolve() / "MNIST" / "raw"
    return ConfigError(f"data.root={root!r}: MNIST not found and not downloadable; put "
                       f"train-images-idx3-ubyte etc. (or their .gz) in {where} or set "
                       f"data.download=true with network access")


def mnist_dataset(cfg: DataConfig, train: bool, transform=None):
    """The torchvision dataset; a one-line ConfigError when it is missing."""
    from torchvision.datasets import MNIST
    try:
        return MNIST(root=cfg.root, train=train, download=cfg.download, transform=transform)
    except (RuntimeError, OSError) as exc:  # "Dataset not found" / URL errors
        raise _missing(cfg.root) from exc


def load_mnist_tensors(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as (uint8 images (N, 28, 28), int64 labels (N,)), subset applied."""
    ds = mnist_dataset(cfg, train)
    images, labels = ds.data, ds.targets
    limit = cfg.subset if train else cfg.test_subset
    if limit:
        images, labels = images[:limit], labels[:limit]
    return images.contiguous(), labels.contiguous()


def mnist_size(cfg: DataConfig, train: bool = True) -> int:
    """Number of samples in the split after ``subset`` — without reading the files."""
    n = SIZES["train" if train else "test"]
    limit = cfg.subset if train else cfg.test_subset
    return min(n, limit) if limit else n


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28), bit-identical to ToTensor()+Normalize."""
    return images.unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
