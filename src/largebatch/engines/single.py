"""One process, one device: nothing to synchronise."""
from __future__ import annotations

import torch
from torch import nn

from largebatch.engines.native import NativeEngine


class SingleEngine(NativeEngine):
    """The embedded default: the model on one device, no process group."""

    name = "single"

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Move the model to the device and keep the optimizer as is."""
        self.model = model.to(self.device)
        self.optimizer = optimizer
        return self.model

    def start_grad_probe(self) -> str:
        """One process: the trainer reads each micro-batch's gradient from ``.grad``."""
        return "micro"
