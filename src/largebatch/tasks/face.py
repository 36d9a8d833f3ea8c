"""Face recognition: a backbone producing embeddings + the class-sharded Partial FC head.

Parts: the backbone is replicated (DDP/ZeRO wrap it), the head is sharded by class and
stepped by its own optimizer (``sharded_optimizer``). Per window the head fixes its class
sample from all of the window's labels (``begin_window``); each micro-batch's loss is already
divided by the window's GLOBAL sample count, so its weight is 1 (not ``len(y) / window``) and
its report weight is this rank's window (see ``Task.report_weight``).

Evaluation: verification as the field reports it (``largebatch.face.verification``) on each
set. Every rank embeds its share of the pairs (image + flip); the squared distances are placed
into one global vector (summed over ranks), and the 10-fold accuracy, its std and TAR@FAR are
computed identically on every rank. A TAR@FAR a set cannot resolve (fewer than 1/FAR impostor
pairs) is None with a ``<key>_note``; such a metric may never be the one the target or the
plateau logic follow (``FaceTask.metric`` refuses it).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from largebatch.config import ConfigError
from largebatch.face import (CombinedMargin, PartialFC, PartialFCAdamW, PartialFCSGD,
                             expected_positive_share, fc_memory)
from largebatch.face.verification import (FARS, far_resolution_note, flip_embed, metric_keys,
                                          squared_distances, verification_metrics)
from largebatch.models import build_face_backbone
from largebatch.models.iresnet import IRESNET_LAYERS
from largebatch.plan import BatchPlan
from largebatch.registry import DATASETS
from largebatch.plan_text import format_bytes
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


def _set_metrics(name: str | None) -> tuple[Metric, ...]:
    """The figures ``verification_metrics`` reports for one set (None: the primary one)."""
    acc, std, *tars = metric_keys(name)
    return (Metric(acc, "max"), Metric(std, "min"), *(Metric(t, "max") for t in tars))


def pair_distances(model: nn.Module, loader: Any, engine: Any) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Squared distances of every pair of a verification set, in global pair order.

    Each rank embeds its share (image + flip, under the engine's autocast, fp32 out) and
    writes its pairs into a zero table at their global indices; each pair lives on exactly one
    rank, so a sum over ranks gathers the table exactly (x + 0 = x) on every rank.

    Returns:
        ``(dist, same)``: float64 distances and 0/1 labels of all pairs (same on every rank).
    """
    index, dist, same = [], [], []
    # Every rank runs as many forward passes: under ZeRO 3 each one gathers the partitioned
    # parameters (a collective), and pair shares can differ by a batch between ranks.
    passes = int(engine.reduce_scalars([float(len(loader))], op="max")[0])
    batches, pair_shape = iter(loader), None
    for _ in range(passes):
        batch = next(batches, None)
        if batch is None:  # this rank is done: a one-pair dummy pass, not recorded
            if pair_shape is None:
                raise RuntimeError("verification: a rank holds no pair of the set (fewer "
                                   "pairs than ranks)")
            with engine.autocast():
                flip_embed(model, torch.zeros(2, *pair_shape, device=engine.device))
            continue
        x, y = batch
        n, pair_shape = x.shape[0], x.shape[2:]
        with engine.autocast():
            emb = flip_embed(model, x.to(engine.device).flatten(0, 1))
        dist.append(squared_distances(emb.view(n, 2, -1)).cpu())
        index.append(y[:, 0].long().cpu())
        same.append(y[:, 1].double().cpu())
    index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    total = int(engine.reduce_scalars([float(index.max() + 1) if len(index) else 0.0],
                                      op="max")[0])
    # Column 0: distance, 1: same, 2: count (every pair must be embedded exactly once).
    table = torch.zeros(total, 3, dtype=torch.float64)
    if len(index):
        table[index, 0] = torch.cat(dist)
        table[index, 1] = torch.cat(same)
        table[index, 2] = 1.0
    table = torch.tensor(engine.reduce_scalars(table.flatten().tolist(), op="sum"),
                         dtype=torch.float64).view(total, 3)
    if not bool((table[:, 2] == 1).all()):
        raise RuntimeError("verification: every pair must be embedded exactly once over the "
                           "ranks (pair indices overlap or have gaps)")
    return table[:, 0], table[:, 1]


class FaceTask(Task):
    """Margin-softmax identities training; scored by verification accuracy."""

    name = "face"

    @property
    def metrics(self) -> tuple[Metric, ...]:  # type: ignore[override]
        """``verification_acc|std``, ``tar_at_far_1e-3|1e-4`` (the first set;
        ``verification_acc`` is the primary metric), then ``NAME_acc|std|tar_at_far_*`` for
        every ``face.val_targets`` set NAME (see ``evaluate``)."""
        if not self._has_pairs():  # nothing to evaluate: the primary metric is train_loss
            return ()
        names = dict.fromkeys([None, *self.cfg.face.val_targets])
        return tuple(m for name in names for m in _set_metrics(name))

    def _has_pairs(self) -> bool:
        """Whether there is any verification set: the data's own held-out pairs (synthetic
        identities) or a ``face.val_targets`` entry."""
        own = DATASETS.trait(self.cfg.data.name, "synthetic", False)
        return bool(own or self.cfg.face.val_targets)

    def metric(self, name: str, key: str) -> Metric:
        """The metric called ``name``; a TAR@FAR only where its set resolves the FAR.

        ``train.target_metric`` and ``schedule.plateau.metric`` compare every evaluation's
        value: a metric that can be None (a set with fewer than 1/FAR impostor pairs) would
        break them, so it is refused here, before the run starts.

        Raises:
            ConfigError: not a metric of this task, or a TAR@FAR its set cannot resolve.
        """
        metric = super().metric(name, key)
        for far in FARS:
            if name.endswith(f"tar_at_far_{far}"):
                set_name = name[:-len(f"tar_at_far_{far}")].rstrip("_") or None
                note = far_resolution_note(self._impostor_pairs(set_name), far)
                if note:
                    raise ConfigError(f"{key}={name!r} can be null: {note}; follow an accuracy "
                                      f"(e.g. {metric_keys(set_name)[0]}) instead")
        return metric

    def _impostor_pairs(self, set_name: str | None) -> int:
        """Impostor pairs of a set (None: the primary one), counted without decoding."""
        synthetic = DATASETS.trait(self.cfg.data.name, "synthetic", False)
        if set_name is None:
            set_name = "synthetic" if synthetic else next(iter(self.cfg.face.val_targets), "")
        if set_name == "synthetic" and synthetic:
            from largebatch.data.faces import pair_ids
            return int((pair_ids(self.cfg)[1] == 0).sum())
        from largebatch.data.bin_pairs import load_bin, missing_val_target, val_paths
        error = missing_val_target(self.cfg)
        if error:
            raise ConfigError(error)
        return sum(not s for s in load_bin(val_paths(self.cfg)[set_name])[1])

    # ---- what ``largebatch plan`` shows ---------------------------------------------------
    def plan_report(self, plan: BatchPlan) -> dict[str, Any]:
        """The Partial FC head's memory per rank and logits per micro-step (``face_head``).

        Weights + gradient + optimizer state of the largest shard (``largebatch.face.
        fc_memory``; SGD momentum for sgd/lars when optim.momentum > 0, AdamW moments for
        adamw/lamb), the ``(global micro-batch x sampled classes)`` logits, and the expected
        share of classes present in one global batch (a sample_rate below it keeps mostly
        positives).
        """
        f, o = self.cfg.face, self.cfg.optim
        optimizer = "adamw" if o.name in ("adamw", "lamb") else \
            "sgd" if o.momentum > 0 else "none"
        # fp32: the head keeps fp32 class centres; autocast only casts the logits' inputs.
        mem = fc_memory(f.num_classes, f.embedding_size, plan.world_size, f.sample_rate,
                        dtype="fp32", optimizer=optimizer, global_micro_batch=plan.batch_unit,
                        sparse_update=f.sparse_update)
        mem["expected_positive_share"] = expected_positive_share(f.num_classes,
                                                                 plan.global_size)
        mem["optimizer"] = optimizer
        return {"face_head": mem}

    def describe_plan(self, plan: BatchPlan) -> list[str]:
        """FC memory, logits and a sample_rate warning, below the plan's own lines."""
        m, f = self.plan_report(plan)["face_head"], self.cfg.face
        lines = [
            f"  face head: {f.num_classes} classes x d={f.embedding_size}, {m['num_local']} per "
            f"rank (largest shard), sample_rate {f.sample_rate:g} -> {m['num_sample']} rows per "
            f"window",
            f"  fc memory per rank: weights {format_bytes(m['weight_bytes'])} + gradient "
            f"{format_bytes(m['grad_bytes'])} + optimizer ({m['optimizer']}) "
            f"{format_bytes(m['optimizer_bytes'])} = {format_bytes(m['total_bytes'])}",
            f"  logits per micro-step: {plan.batch_unit} x {m['num_sample']} = "
            f"{m['logits_elements']} elements ({format_bytes(m['logits_bytes'])} fp32 per rank)",
        ]
        share = m["expected_positive_share"]
        if f.sample_rate < share:
            lines.append(f"  warning: face.sample_rate={f.sample_rate:g} is below the expected "
                         f"share of classes present in one global batch of {plan.global_size} "
                         f"({share:.3f}): most windows keep only positives, no negatives are "
                         f"sampled")
        if not self._has_pairs():
            lines.append("  evaluation: no verification set (face.val_targets is empty): the "
                         "target and plateau follow the training loss (train_loss)")
        return lines

    def build(self) -> TaskParts:
        """Backbone (``model.name``) and this rank's Partial FC shard (after seeding)."""
        f, m = self.cfg.face, self.cfg.model
        if m.name in IRESNET_LAYERS and DATASETS.trait(self.cfg.data.name, "synthetic", False) \
                and f.image_size != 112:
            raise ConfigError(f"face.image_size={f.image_size} but model.name={m.name} needs "
                              f"112 x 112 inputs (set face.image_size=112 or use tiny_face)")
        backbone = build_face_backbone(m, f.embedding_size)  # ConfigError on a non-face name
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
    def evaluate(self, model: nn.Module, loader: Any, engine: Any
                 ) -> dict[str, float | str | None]:
        """10-fold accuracy, its std and TAR@FAR 1e-3/1e-4 (``face.verification``; a TAR
        the set cannot resolve is None, with a ``<key>_note`` string).

        Args:
            model: the backbone (in eval mode).
            loader: this rank's share of one verification set (batches ``x: (n, 2, 3, H,
                W)``, ``y: (n, 2) = [global pair index, same]``), or a Mapping NAME -> such
                loaders (the held-out identities, the ``.bin`` sets of ``face.val_targets``).
            engine: for the device, autocast and the sum over ranks.

        Returns:
            ``verification_acc``, ``verification_std``, ``tar_at_far_1e-3``,
            ``tar_at_far_1e-4`` of the first set and, for a Mapping, ``NAME_acc``,
            ``NAME_std``, ``NAME_tar_at_far_1e-3|1e-4`` of every set; identical on every rank
            (every rank scores the same gathered float64 distances with the same numpy code).
        """
        named = isinstance(loader, Mapping)
        sets = list(loader.items()) if named else [("verification", loader)]
        if not sets:  # trained without verification sets: the loop follows train_loss
            return {}
        out: dict[str, float | str | None] = {}
        for i, (name, pairs) in enumerate(sets):
            dist, same = pair_distances(model, pairs, engine)
            if i == 0:
                out.update(verification_metrics(dist, same))
            if named:
                out.update(verification_metrics(dist, same, name))
        return out
