"""Image classification with a log-softmax network (the MNIST study's task)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError
from largebatch.data.loaders import PAD_LABEL
from largebatch.models import build_model
from largebatch.tasks.base import Metric, Task, TaskParts


class ClassificationTask(Task):
    """Negative log-likelihood of a network that outputs log-probabilities; scored by the test
    loss and top-1 accuracy over the whole evaluation split."""

    name = "classification"
    metrics = (Metric("val_acc", "max"), Metric("val_loss", "min"))
    #: Which splits' labels were checked against the model's outputs (once each: one sync).
    _checked: frozenset[str] = frozenset()

    def build(self) -> TaskParts:
        """The configured network (``model.name``), replicated on every rank."""
        return TaskParts(model=build_model(self.cfg.model))

    def _check_labels(self, y: torch.Tensor, classes: int, split: str) -> None:
        """A label outside the model's ``classes`` outputs is a one-line ConfigError, not an
        IndexError (CPU) or a device-side assert (CUDA); checked on the first batch of each
        split (the datasets check their own labels when they load them)."""
        if split in self._checked:
            return
        self._checked = self._checked | {split}
        y = y[y != PAD_LABEL]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise ConfigError(f"data.name={self.cfg.data.name!r}: {split} label {bad} is outside "
                              f"the {classes} classes model.name={self.cfg.model.name!r} "
                              f"outputs (0..{classes - 1})")

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean NLL of the micro-batch."""
        out = model(x)
        self._check_labels(y, out.shape[-1], "training")
        return F.nll_loss(out, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, engine: Any) -> dict[str, float]:
        """Test loss and accuracy; per-rank sums all-reduced so every sample counts once."""
        sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
        for x, y in loader:
            with engine.autocast():
                out = model(x.to(engine.device))
            y = y.to(engine.device)
            self._check_labels(y, out.shape[-1], "evaluation")
            # Padding (label PAD_LABEL, nll_loss's ignore_index) evens out the ranks' passes.
            sums[0] += F.nll_loss(out.float(), y, reduction="sum", ignore_index=PAD_LABEL)
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += (y != PAD_LABEL).sum()
        loss_sum, correct, count = engine.reduce_scalars(sums.tolist(), op="sum")
        return {"val_acc": correct / count, "val_loss": loss_sum / count}
