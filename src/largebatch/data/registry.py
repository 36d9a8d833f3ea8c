"""Dataset registry: name -> how big it is, how to prepare it, and its rank-sharded loaders.

The plan needs the training set's size before anything is read (``largebatch plan`` prints it
for a cluster you are not on), the run needs the loaders; both look the dataset up here, so no
other module knows which datasets exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
    #: The callables take the whole ``Config`` (e.g. ``face.*`` sizes a synthetic set).
    full_config: bool = False


def _section(spec: DatasetSpec, cfg: Any) -> Any:
    """What ``spec``'s callables take: the whole Config or its data section."""
    data = getattr(cfg, "data", cfg)
    if spec.full_config:
        if data is cfg:
            raise ValueError(f"data.name={data.name!r} needs the whole Config, not its data "
                             f"section")
        return cfg
    return data


def _mnist() -> DatasetSpec:
    from largebatch.data.loaders import build_eval_loader, build_train_loader
    from largebatch.data.mnist import mnist_size, prepare_data
    return DatasetSpec(size=mnist_size, prepare=prepare_data, train_loader=build_train_loader,
                       eval_loader=build_eval_loader)


def _synthetic_faces() -> DatasetSpec:
    from largebatch.data.faces import synthetic_faces_spec
    return synthetic_faces_spec()


def _recordio() -> DatasetSpec:
    from largebatch.data.recordio import recordio_spec
    return recordio_spec()


def _imagefolder() -> DatasetSpec:
    from largebatch.data.imagefolder import imagefolder_spec
    return imagefolder_spec()


_DATASETS: dict[str, Callable[[], DatasetSpec]] = {"mnist": _mnist,
                                                   "synthetic_faces": _synthetic_faces,
                                                   "recordio": _recordio,
                                                   "imagefolder": _imagefolder}


def register(name: str, factory: Callable[[], DatasetSpec]) -> None:
    """Make ``data.name=NAME`` available (the factory is called lazily, on first use)."""
    _DATASETS[name] = factory


def dataset(name: str) -> DatasetSpec:
    """The spec of ``data.name``; a ConfigError naming the known datasets otherwise."""
    if name not in _DATASETS:
        raise ConfigError(f"data.name={name!r} is not one of {'|'.join(sorted(_DATASETS))}")
    return _DATASETS[name]()


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
