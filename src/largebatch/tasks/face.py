"""Face recognition: a backbone producing embeddings + the class-sharded Partial FC head.

Parts: the backbone is replicated (DDP/ZeRO wrap it), the head is sharded by class and
stepped by its own optimizer (``sharded_optimizer``). Per window the head fixes its class
sample from all of the window's labels (``begin_window``); each micro-batch's loss is already
divided by the window's GLOBAL sample count, so its weight is 1 (not ``len(y) / window``) and
its report weight is this rank's window (see ``Task.report_weight``).

Evaluation: verification on held-out identities. Every rank embeds its share of the pairs;
the cosine scores are placed into one global vector (summed over ranks), and the accuracy at
the best threshold over the WHOLE pair set is computed identically on every rank.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError
from largebatch.face import CombinedMargin, PartialFC, PartialFCAdamW, PartialFCSGD
from largebatch.models import build_face_backbone
from largebatch.tasks.base import Metric, Task, TaskParts


def build_margin(face: Any) -> CombinedMargin:
    """``face.margin``: arcface (m2), cosface (m3) or combined (m1, m2, m3), scale ``s``."""
    if face.margin == "arcface":
        return CombinedMargin(s=face.s, m2=face.m2)
    if face.margin == "cosface":
        return CombinedMargin(s=face.s, m3=face.m3)
    if face.margin == "combined":
        return CombinedMargin(s=face.s, m1=face.m1, m2=face.m2, m3=face.m3)
    raise ConfigError(f"face.margin={face.margin!r} is not one of arcface|cosface|combined")


def build_head_optimizer(optim: Any, head: PartialFC, lr: float) -> torch.optim.Optimizer:
    """The head's row-sparse optimizer for ``optim.name``: SGD for sgd/lars, AdamW for
    adamw/lamb (the trust ratio of LARS/LAMB has no meaning for a sampled row block)."""
    if optim.name in ("sgd", "lars"):
        if optim.dampening:
            raise ConfigError(f"optim.dampening={optim.dampening} is not supported by the "
                              f"Partial FC head's SGD (use 0)")
        return PartialFCSGD(head, lr=lr, momentum=optim.momentum,
                            weight_decay=optim.weight_decay, nesterov=optim.nesterov)
    eps = 1e-8 if optim.eps is None else optim.eps
    return PartialFCAdamW(head, lr=lr, betas=tuple(optim.betas), eps=eps,
                          weight_decay=optim.weight_decay)


def best_threshold_accuracy(scores: torch.Tensor, same: torch.Tensor) -> float:
    """Accuracy of ``score >= t`` for the best threshold ``t`` over all pairs (ties kept
    together: a threshold never splits equal scores)."""
    order = torch.argsort(scores, descending=True)
    s, y = scores[order], same[order].double()
    tp = torch.cat([y.new_zeros(1), torch.cumsum(y, 0)])  # positives among the top k
    k = torch.arange(len(s) + 1, dtype=torch.float64)
    correct = tp + (len(s) - y.sum()) - (k - tp)  # TP + TN when the top k are called "same"
    valid = torch.ones(len(s) + 1, dtype=torch.bool)
    valid[1:-1] = s[:-1] != s[1:]
    return float(correct[valid].max() / len(s))


class FaceTask(Task):
    """Margin-softmax identities training; scored by verification accuracy."""

    name = "face"
    metrics = (Metric("verification_acc", "max"),)

    def build(self) -> TaskParts:
        """Backbone (``model.name``) and this rank's Partial FC shard (after seeding)."""
        f = self.cfg.face
        if self.cfg.model.name != "tiny_face":
            raise ConfigError(f"model.name={self.cfg.model.name!r} is not a face backbone "
                              f"(use tiny_face with task.name=face)")
        backbone = build_face_backbone(self.cfg.model, f.embedding_size)
        self.head = PartialFC(build_margin(f), f.embedding_size, f.num_classes,
                              sample_rate=f.sample_rate, sparse_update=f.sparse_update,
                              seed=self.cfg.train.seed)
        return TaskParts(model=backbone, sharded=[self.head])

    def sharded_optimizer(self, module: nn.Module, lr: float) -> torch.optim.Optimizer:
        """The head's optimizer, with the backbone's (scaled) LR and hyper-parameters."""
        return build_head_optimizer(self.cfg.optim, module, lr)

    def begin_window(self, labels: list[torch.Tensor]) -> None:
        """Sample the head's classes once from all of the window's labels (collective)."""
        self.head.begin_window(torch.cat(labels))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The micro-batch's share of the global window loss (same value on every rank)."""
        return self.head(model(x), y)

    def micro_weight(self, n: int, window: int) -> float:
        """1: the head already divides by the window's global sample count."""
        return 1.0

    def report_weight(self, n: int, window: int) -> float:
        """This rank's window (see ``Task.report_weight``)."""
        return float(window)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, engine: Any) -> dict[str, float]:
        """Best-threshold verification accuracy over every pair of every rank."""
        index, scores, same = [], [], []
        for x, y in loader:
            n = x.shape[0]
            with engine.autocast():
                emb = model(x.to(engine.device).flatten(0, 1))
            emb = F.normalize(emb.float(), dim=1).view(n, 2, -1)
            scores.append((emb[:, 0] * emb[:, 1]).sum(1).double().cpu())
            index.append(y[:, 0].cpu())
            same.append(y[:, 1].double().cpu())
        index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
        total = int(engine.reduce_scalars([float(index.max() + 1) if len(index) else 0.0],
                                          op="max")[0])
        # Column 0: scores, 1: same, 2: count; each pair lives on one rank, so a sum gathers.
        table = torch.zeros(total, 3, dtype=torch.float64)
        if len(index):
            table[index, 0] = torch.cat(scores)
            table[index, 1] = torch.cat(same)
            table[index, 2] = 1.0
        table = torch.tensor(engine.reduce_scalars(table.flatten().tolist(), op="sum"),
                             dtype=torch.float64).view(total, 3)
        if not bool((table[:, 2] == 1).all()):
            raise RuntimeError("verification: every pair must be scored exactly once")
        return {"verification_acc": best_threshold_accuracy(table[:, 0], table[:, 1])}
