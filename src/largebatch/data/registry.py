"""Datasets by name: how big a split is, how to prepare it, and its rank-sharded loaders.

The plan needs the training set's size before anything is read (``largebatch plan`` prints it
for a cluster you are not on), the run needs the loaders; both look the dataset up in the
``data.name`` registry (``largebatch.registry.DATASETS``, filled by ``largebatch.data``), so no
other module knows which datasets exist and a user's ``DATASETS.register`` adds one the config
accepts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from largebatch.config import DataConfig
from largebatch.dist import DistEnv
from largebatch.registry import DATASETS


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
    #: The callables take the whole ``Config`` (e.g. ``face.*`` sizes a synthetic set).
    full_config: bool = False
    #: ``files(cfg)`` -> the files the split is read from, whose sizes and first bytes every
    #: rank compares before the run starts (None: the config and the size say it all).
    files: Optional[Callable[..., list[Path]]] = None

    def data_files(self, cfg: Any) -> list[Path]:
        """The files to fingerprint (``files``), or none."""
        return [] if self.files is None else list(self.files(_section(self, cfg)))


def _section(spec: DatasetSpec, cfg: Any) -> Any:
    """What ``spec``'s callables take: the whole Config or its data section."""
    data = getattr(cfg, "data", cfg)
    if spec.full_config:
        if data is cfg:
            raise ValueError(f"data.name={data.name!r} needs the whole Config, not its data "
                             f"section")
        return cfg
    return data


def mnist_spec() -> DatasetSpec:
    """MNIST (``data.name=mnist``): in-memory or torch DataLoader paths."""
    from largebatch.data.loaders import build_eval_loader, build_train_loader
    from largebatch.data.mnist import mnist_files, mnist_size, prepare_data
    return DatasetSpec(size=mnist_size, prepare=prepare_data, train_loader=build_train_loader,
                       eval_loader=build_eval_loader, files=mnist_files)


def dataset(name: str) -> DatasetSpec:
    """The spec of ``data.name``; a ConfigError naming the registered datasets otherwise."""
    return DATASETS.get(name)()


def dataset_size(cfg: Any, train: bool = True) -> int:
    """Samples in the configured split (what the batch plan is computed from).

    ``cfg`` is the whole Config or (for datasets that need only it) its data section.
    """
    spec = dataset(getattr(cfg, "data", cfg).name)
    return spec.size(_section(spec, cfg), train)


def build_loaders(cfg: Any, micro_size: int, denv: DistEnv, seed: int,
                  device: torch.device) -> tuple[object, object]:
    """This rank's training and evaluation loaders (``cfg``: the Config or its data section)."""
    spec = dataset(getattr(cfg, "data", cfg).name)
    arg = _section(spec, cfg)
    return (spec.train_loader(arg, micro_size, denv.rank, denv.world_size, seed, device),
            spec.eval_loader(arg, denv.rank, denv.world_size, device))
