"""DistributedDataParallel with exactly one gradient all-reduce per optimizer step."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch.engines.base import Engine
from largebatch.models import sync_batchnorm


class DDPEngine(Engine):
    """Wraps the model in DDP; ``accumulate`` skips the all-reduce until the window's last
    micro-batch (``no_sync``), so accumulation costs one all-reduce per optimizer step."""

    name = "ddp"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Move to the device and wrap; DDP broadcasts rank 0's parameters to every rank
        (BatchNorm becomes SyncBatchNorm first where the model asks, ``model.sync_bn``)."""
        model = sync_batchnorm(model, self.device).to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DDP(model, device_ids=device_ids)
        self.optimizer = optimizer
        return self.model

    @contextlib.contextmanager
    def accumulate(self, is_boundary: bool) -> Iterator[None]:
        """Inside a window, backward passes only accumulate locally; the boundary syncs."""
        if is_boundary:
            yield
        else:
            with self.model.no_sync():
                yield
