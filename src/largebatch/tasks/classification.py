"""Image classification with a log-softmax network (the MNIST study's task)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.data.loaders import PAD_LABEL
from largebatch.models import build_model
from largebatch.tasks.base import Metric, Task, TaskParts


class ClassificationTask(Task):
    """Negative log-likelihood of a network that outputs log-probabilities; scored by the test
    loss and top-1 accuracy over the whole evaluation split."""

    name = "classification"
    metrics = (Metric("val_acc", "max"), Metric("val_loss", "min"))

    def build(self) -> TaskParts:
        """The configured network (``model.name``), replicated on every rank."""
        return TaskParts(model=build_model(self.cfg.model))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean NLL of the micro-batch."""
        return F.nll_loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, engine: Any) -> dict[str, float]:
        """Test loss and accuracy; per-rank sums all-reduced so every sample counts once."""
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for x, y in loader:
            with engine.autocast():
                out = model(x.to(engine.device))
            y = y.to(engine.device)
            # Padding (label PAD_LABEL, nll_loss's ignore_index) evens out the ranks' passes.
            sums[0] += F.nll_loss(out.float(), y, reduction="sum", ignore_index=PAD_LABEL)
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += (y != PAD_LABEL).sum()
        loss_sum, correct, count = engine.reduce_scalars(sums.tolist(), op="sum")
        return {"val_acc": correct / count, "val_loss": loss_sum / count}
