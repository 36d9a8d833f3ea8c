"""Face backbones: a tiny CNN producing an embedding (the synthetic-faces smoke scale)."""
from __future__ import annotations

import torch
from torch import nn


class TinyFace(nn.Module):
    """Two 3x3 convolutions, 2x2 average pooling and a linear embedding. No BatchNorm: its
    batch statistics would make a rank's output depend on how the batch is split.

    Args:
        embedding_size: output dimension.
        width: channels of the convolutions.
        dropout: dropout probability before the embedding layer (``model.dropout``).
        channels_last: convolutions (weights and inputs) in channels-last memory format.
    """

    def __init__(self, embedding_size: int = 32, width: int = 16, dropout: float = 0.0,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.dropout = nn.Dropout(p=dropout)
        self.embed = nn.Linear(4 * width, embedding_size)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, H, W)`` images -> ``(n, embedding_size)`` embeddings."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.embed(self.dropout(self.features(x)))
