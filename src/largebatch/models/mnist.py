"""The MNIST nets: the classic PyTorch example CNN and a dropout-free MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeedCNN(nn.Module):
    """The network of the classic PyTorch MNIST example (and of the batch-size study).

    conv 1->10 5x5, max-pool, ReLU; conv 10->20 5x5, Dropout2d, max-pool, ReLU;
    fc 320->50, ReLU, dropout; fc 50->10; log-softmax.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the 10 digits for a (N, 1, 28, 28) batch."""
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class MLP(nn.Module):
    """A small deterministic MLP (no dropout): what invariance tests compare exactly."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the 10 digits."""
        return F.log_softmax(self.net(x), dim=1)
