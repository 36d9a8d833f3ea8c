"""``synthetic_faces``: a tiny, deterministic identities dataset for the face task on CPU.

Identity ``c`` has a prototype image drawn from a generator seeded by ``c`` alone (so every
rank, world size and run agrees on it without communication). A training sample is its
identity's prototype plus Gaussian noise whose generator is seeded by ``(seed, epoch, index)``:
the same sample on every layout, a fresh draw every epoch. Training identities are
``[0, face.num_classes)`` with ``face.samples_per_class`` samples each (``data.subset`` caps the
count); the verification set uses ``face.eval_identities`` held-out identities (ids past the
training ones) in ``face.eval_pairs`` fixed pairs, half of them of the same identity.

Loaders are rank-sharded with DistributedSampler semantics (``shard_indices``). Evaluation
batches are ``(x, y)`` with ``x: (n, 2, 3, H, W)`` (both images of each pair) and
``y: (n, 2)`` = ``[global pair index, same identity 0/1]``, so the task can place every
rank's scores into one global vector.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from largebatch.config import Config, ConfigError
from largebatch.data.loaders import Batch, shard_indices

_PROTO_SEED = 0x5EED_FACE
_EVAL_SEED = 0xE7A1


def _check(cfg: Config) -> None:
    f = cfg.face
    for key in ("num_classes", "samples_per_class", "eval_identities", "eval_pairs",
                "image_size"):
        if getattr(f, key) < 1:
            raise ConfigError(f"face.{key}={getattr(f, key)} must be >= 1")
    if f.eval_identities < 2:
        raise ConfigError(f"face.eval_identities={f.eval_identities} must be >= 2 (pairs of "
                          f"different identities)")
    if f.noise < 0:
        raise ConfigError(f"face.noise={f.noise} must be >= 0")


def prototypes(ids: torch.Tensor, image_size: int) -> torch.Tensor:
    """The prototype image of each identity id (deterministic from the id alone)."""
    gen = torch.Generator()
    out = torch.empty(len(ids), 3, image_size, image_size)
    for i, c in enumerate(ids.tolist()):
        gen.manual_seed(_PROTO_SEED + int(c))
        out[i] = torch.randn(3, image_size, image_size, generator=gen)
    return out


def _noise(keys: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator()
    out = torch.empty(len(keys), *shape)
    for i, key in enumerate(keys):
        gen.manual_seed(key % 2 ** 63)
        out[i] = torch.randn(*shape, generator=gen)
    return out


def train_size(cfg: Config, train: bool = True) -> int:
    """Samples of the split: C x samples_per_class (capped by data.subset), or the pairs."""
    _check(cfg)
    if not train:
        return cfg.face.eval_pairs
    n = cfg.face.num_classes * cfg.face.samples_per_class
    return min(n, cfg.data.subset) if cfg.data.subset else n


class SyntheticFaceLoader:
    """Training micro-batches of one rank: label = index // samples_per_class."""

    def __init__(self, cfg: Config, batch_size: int, rank: int, world: int, seed: int,
                 device: torch.device) -> None:
        self.n, self.spc = train_size(cfg), cfg.face.samples_per_class
        self.noise, self.size = cfg.face.noise, cfg.face.image_size
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.drop_last, self.device, self.epoch = cfg.data.drop_last, device, 0
        self.protos = prototypes(torch.arange(math.ceil(self.n / self.spc)), self.size)

    def set_epoch(self, epoch: int) -> None:
        """Choose the permutation and the noise draws of ``epoch`` (same on all ranks)."""
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        return shard_indices(self.n, self.rank, self.world, self.seed, self.epoch, True,
                             self.drop_last)

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def sample(self, index: torch.Tensor) -> Batch:
        """Images and labels of global sample ``index`` for the current epoch."""
        labels = index // self.spc
        keys = [(self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(i) for i in index]
        x = self.protos[labels] + self.noise * _noise(keys, (3, self.size, self.size))
        return x.to(self.device), labels.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        idx = self._indices()
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            yield self.sample(idx[start:start + self.batch_size])


def verification_pairs(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (P, 2, 3, H, W), same (P,))`` of the held-out identities (fixed)."""
    f = cfg.face
    gen = torch.Generator().manual_seed(_EVAL_SEED)
    p = f.eval_pairs
    same = (torch.arange(p) % 2 == 0).long()
    a = torch.randint(0, f.eval_identities, (p,), generator=gen)
    shift = torch.randint(1, f.eval_identities, (p,), generator=gen)
    b = torch.where(same.bool(), a, (a + shift) % f.eval_identities)
    ids = torch.stack([a, b], 1) + f.num_classes  # held out: past every training identity
    protos = prototypes(torch.arange(f.eval_identities) + f.num_classes, f.image_size)
    keys = [_EVAL_SEED * 7_919 + k for k in range(2 * p)]
    noise = _noise(keys, (3, f.image_size, f.image_size)).view(p, 2, 3, f.image_size,
                                                                 f.image_size)
    return protos[ids - f.num_classes] + f.noise * noise, same


class PairLoader:
    """This rank's unpadded share of the verification pairs (every pair counted once)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device,
                 batch_size: int = 256) -> None:
        images, same = verification_pairs(cfg)
        self.index = torch.arange(rank, len(same), world)
        self.images, self.same = images[self.index], same[self.index]
        self.batch_size, self.device = batch_size, device
        self.total = len(same)

    def set_epoch(self, epoch: int) -> None:
        """The pairs are fixed."""

    def __len__(self) -> int:
        return math.ceil(len(self.index) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for s in range(0, len(self.index), self.batch_size):
            e = s + self.batch_size
            y = torch.stack([self.index[s:e], self.same[s:e]], 1)
            yield self.images[s:e].to(self.device), y.to(self.device)


def synthetic_faces_spec():  # -> DatasetSpec (imported lazily by the registry)
    """The registry entry of ``data.name=synthetic_faces`` (nothing to download)."""
    from largebatch.data.registry import DatasetSpec
    return DatasetSpec(size=train_size, prepare=lambda data, denv: None,
                       train_loader=SyntheticFaceLoader,
                       eval_loader=lambda cfg, rank, world, device: PairLoader(cfg, rank, world,
                                                                               device),
                       full_config=True)
