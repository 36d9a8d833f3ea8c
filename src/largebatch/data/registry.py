"""Dataset registry: name -> how big it is, how to prepare it, and its rank-sharded loaders.

The plan needs the training set's size before anything is read (``largebatch plan`` prints it
for a cluster you are not on), the run needs the loaders; both look the dataset up here, so no
other module knows which datasets exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from largebatch.config import ConfigError, DataConfig
from largebatch.dist import DistEnv


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of largebatch needs to know about one dataset.

    Attributes:
        size: ``size(cfg, train)`` -> samples in the split (after subsets), without reading it.
        prepare: ``prepare(cfg, denv)`` downloads or checks the files (collective; all ranks).
        train_loader: ``(cfg, micro_size, rank, world, seed, device)`` -> a BatchLoader.
        eval_loader: ``(cfg, rank, world, device)`` -> this rank's unpadded share of the split.
    """

    size: Callable[[DataConfig, bool], int]
    prepare: Callable[[DataConfig, DistEnv], None]
    train_loader: Callable[..., object]
    eval_loader: Callable[..., object]


def _mnist() -> DatasetSpec:
    from largebatch.data.loaders import build_eval_loader, build_train_loader
    from largebatch.data.mnist import mnist_size, prepare_data
    return DatasetSpec(size=mnist_size, prepare=prepare_data, train_loader=build_train_loader,
                       eval_loader=build_eval_loader)


_DATASETS: dict[str, Callable[[], DatasetSpec]] = {"mnist": _mnist}


def register(name: str, factory: Callable[[], DatasetSpec]) -> None:
    """Make ``data.name=NAME`` available (the factory is called lazily, on first use)."""
    _DATASETS[name] = factory


def dataset(name: str) -> DatasetSpec:
    """The spec of ``data.name``; a ConfigError naming the known datasets otherwise."""
    if name not in _DATASETS:
        raise ConfigError(f"data.name={name!r} is not one of {'|'.join(sorted(_DATASETS))}")
    return _DATASETS[name]()


def dataset_size(cfg: DataConfig, train: bool = True) -> int:
    """Samples in the configured split (what the batch plan is computed from)."""
    return dataset(cfg.name).size(cfg, train)


def build_loaders(cfg: DataConfig, micro_size: int, denv: DistEnv, seed: int,
                  device: torch.device) -> tuple[object, object]:
    """This rank's training and evaluation loaders for the configured dataset."""
    spec = dataset(cfg.name)
    return (spec.train_loader(cfg, micro_size, denv.rank, denv.world_size, seed, device),
            spec.eval_loader(cfg, denv.rank, denv.world_size, device))
