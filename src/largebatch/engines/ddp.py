"""DistributedDataParallel with exactly one gradient all-reduce per optimizer step."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch.engines.native import NativeEngine
from largebatch.models import sync_batchnorm


class DDPEngine(NativeEngine):
    """Wraps the model in DDP; ``accumulate`` skips the all-reduce until the window's last
    micro-batch (``no_sync``), so accumulation costs one all-reduce per optimizer step."""

    name = "ddp"
    _bucket_sq: Optional[list[torch.Tensor]] = None  # the probe's squared bucket norms

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

    def start_grad_probe(self) -> str:
        """Several ranks: a communication hook squares each bucket before DDP's usual
        all-reduce. Under ``no_sync`` the hook runs only at the boundary, on the rank's
        accumulated window gradient. One rank: nothing is reduced, ``.grad`` is read."""
        if self.world_size == 1:
            return "micro"
        self._bucket_sq = []
        self.model.register_comm_hook(self._bucket_sq, _squaring_allreduce_hook)
        return "comm_hook"

    def pop_local_grad_sq_norm(self) -> Optional[torch.Tensor]:
        """Sum of the squared bucket norms since the last call (None: no bucket was reduced)."""
        buckets = self._bucket_sq
        if not buckets:
            return None
        total = torch.stack(buckets).sum()
        buckets.clear()
        return total


# No annotations on ``bucket`` and the return: DDP checks them against the real classes, and
# this module's postponed (string) annotations would fail that check.
def _squaring_allreduce_hook(sq_norms: list[torch.Tensor], bucket):  # noqa: ANN001, ANN201
    """Record the local bucket's squared norm (a ``GradBucket``), then reduce exactly as DDP's
    default does (returns its ``Future``)."""
    sq_norms.append(torch.linalg.vector_norm(bucket.buffer().detach()).double().square())
    return allreduce_hook(None, bucket)
