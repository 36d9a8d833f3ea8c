"""Loaders: DistributedSampler semantics, bit-identical in-memory vs torch DataLoader batches."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from largebatch.config import DataConfig, ConfigError
from largebatch.data import MemoryLoader, TorchLoader, load_mnist_tensors, shard_indices


@pytest.mark.parametrize("n, world, drop_last", [(10, 3, False), (10, 3, True), (12, 4, False),
                                                 (7, 2, False), (2, 5, False)])
def test_shards_equal_distributed_sampler(n, world, drop_last):
    for epoch in (0, 3):
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                     seed=11, drop_last=drop_last)
            ref.set_epoch(epoch)
            mine = shard_indices(n, rank, world, seed=11, epoch=epoch, drop_last=drop_last)
            assert mine.tolist() == list(ref)


def test_ranks_are_disjoint_and_cover_the_data():
    shards = [set(shard_indices(1000, r, 4, seed=0, epoch=2).tolist()) for r in range(4)]
    assert sum(len(s) for s in shards) == 1000
    assert set().union(*shards) == set(range(1000))


def test_memory_loader_sizes_with_short_last_batch():
    images = torch.randint(0, 256, (103, 28, 28), dtype=torch.uint8)
    labels = torch.arange(103) % 10
    loader = MemoryLoader(images, labels, batch_size=20, rank=1, world=2, seed=0)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == len(sizes) == 3 and sizes == [20, 20, 12]  # 52 per rank (padded)


def test_memory_loader_matches_torchvision_dataloader(mnist_root):
    cfg = DataConfig(root=str(mnist_root), download=False, subset=600)
    images, labels = load_mnist_tensors(cfg, train=True)
    mem = MemoryLoader(images, labels, batch_size=64, rank=1, world=2, seed=5)
    ref = TorchLoader(cfg, train=True, batch_size=64, rank=1, world=2, seed=5)
    for epoch in (0, 1):
        mem.set_epoch(epoch)
        ref.set_epoch(epoch)
        pairs = list(zip(mem, ref))
        assert len(pairs) == len(mem) == len(ref) == 5
        for (xm, ym), (xr, yr) in pairs:
            assert torch.equal(ym, yr)
            # ToTensor divides by 255 then Normalize; ours does the same float ops.
            torch.testing.assert_close(xm, xr, rtol=0, atol=1e-6)


def test_missing_data_is_a_one_line_error(tmp_path):
    cfg = DataConfig(root=str(tmp_path), download=False)
    with pytest.raises(ConfigError) as exc:
        load_mnist_tensors(cfg, train=True)
    assert "MNIST not found" in str(exc.value) and str(tmp_path) in str(exc.value)
    assert "\n" not in str(exc.value)
