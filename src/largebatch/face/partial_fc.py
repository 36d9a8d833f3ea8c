"""Partial FC: a class-sharded margin-softmax head with per-window class sampling.

Shape of insightface's ``PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate)``:
each rank keeps the class centres of its shard (``weight``: ``num_local x embedding_size``),
all-gathers the embeddings and labels of the batch, and computes the exact softmax over every
rank's (sampled) classes with all-reduced max and sum-exp (``softmax_ce``).

Gradient convention. ``forward`` returns the loss averaged over the *global* batch, the same
value on every rank. The embeddings' gradient that reaches each rank's backbone is
``world_size x dL/dE_local``, so after DDP averages the backbone's gradients (divides by
``world_size``) the backbone receives exactly the gradient of the global-mean loss. The head
is never wrapped by DDP: its gradient is already the exact ``dL/dW_shard``.

Sampling windows. With ``sample_rate < 1`` a window fixes one sample of class rows: every
class present in the window's global labels, plus uniformly drawn negatives up to
``ceil(sample_rate * num_local)`` rows per shard (more when a shard has more positives than
that: positives are never dropped). ``begin_window(labels_of_the_whole_window)``
opens it; each micro-step's ``forward`` then reuses the sample and divides by the window's
global sample count, so the sum of the micro-step losses *is* the loss of one big batch with
that sample (the trainer weights each micro-step by 1, not by ``len(y) / window``). Without
``begin_window``, a forward samples from its own batch (insightface's behaviour) and divides by
its own gathered batch size. The head's optimizer step closes the window.

Sparse update. The window's sampled rows are copied into a small leaf tensor the forward
uses, so gradients (and their memory) exist for the sampled rows only. The head's own
optimizers (``largebatch.face.optim``) update just those rows and their state; unsampled rows
and their momentum stay bit-unchanged. With ``sample_rate == 1`` the leaf is ``weight`` itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError
from largebatch.face.dist_ops import Group, all_gather_labels, all_gather_rows, all_reduce_, \
    gather_sizes, world
from largebatch.face.margins import CombinedMargin
from largebatch.engines.sharded import ShardedModule
from largebatch.face.shards import STATE_FORMAT, init_rows, reshard, shard_range
from largebatch.face.softmax_ce import margin_softmax_ce, normalize_rows


def _unit_rows(embeddings: torch.Tensor, centres: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings and class centres, in the embeddings' dtype (the cosines' matmul).

    fp16 embeddings (autocast) are normalised in fp32 and only the unit rows are cast: fp16's
    range is too narrow for the norms (squares of centre entries ~0.01 fall to subnormals) and
    for their backward, which divides the loss-scaled gradient by each row's norm (a centre's
    is ~0.01 sqrt(d)). Explicit, so it does not hang on autocast's op lists, which differ
    between devices (CPU's keeps norms in fp16). bf16 has fp32's range and stays as it was.
    """
    dtype = embeddings.dtype
    if dtype == torch.float16:
        return (normalize_rows(embeddings.float(), out_dtype=dtype),
                normalize_rows(centres.float(), out_dtype=dtype))
    centres = centres if centres.dtype == dtype else centres.to(dtype)
    return normalize_rows(embeddings), normalize_rows(centres)


@dataclass
class _Window:
    """One accumulation window's class sample."""

    index: Optional[torch.Tensor]  # sorted sampled local rows; None = all rows
    leaf: torch.Tensor  # what the forward multiplies: ``weight`` or a copy of weight[index]
    normalizer: Optional[int]  # the window's global sample count (explicit windows only)


class PartialFC(ShardedModule, nn.Module):
    """Class-sharded margin-softmax head (see the module docstring).

    Args:
        margin: a ``CombinedMargin`` (``ArcFace``, ``CosFace``, ...; a subclass may override
            ``target``).
        embedding_size: embedding dimension ``d``.
        num_classes: number of classes ``C`` over all ranks.
        sample_rate: share ``r`` of each shard's classes used per window (``0 < r <= 1``).
        sparse_update: the head optimizers touch only the window's sampled rows.
        seed: seeds the class-centre init (identical for every world size) and the sampling.
        init_std: standard deviation of the initial class centres.
        process_group: the group the classes are sharded over (default: the world).
        device: where the shard lives.

    Raises:
        ConfigError: on a ``sample_rate`` outside ``(0, 1]``, non-positive sizes, or fewer
            classes than ranks.
    """

    def __init__(self, margin: CombinedMargin, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, sparse_update: bool = True, seed: int = 0,
                 init_std: float = 0.01, process_group: Group = None,
                 device: Any = None) -> None:
        super().__init__()
        if not isinstance(margin, CombinedMargin):
            raise TypeError(f"PartialFC: margin must be a CombinedMargin (ArcFace, CosFace, ...), "
                            f"got {type(margin).__name__}")
        if not 0.0 < sample_rate <= 1.0:
            raise ConfigError(f"face.sample_rate={sample_rate} must be in (0, 1]")
        if embedding_size <= 0 or num_classes <= 0:
            raise ConfigError(f"face: embedding_size={embedding_size} and "
                              f"num_classes={num_classes} must be > 0")
        self.margin, self.group = margin, process_group
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.sparse_update, self.seed = float(sample_rate), sparse_update, seed
        self.rank, self.world_size = world(process_group)
        self.class_start, self.num_local = shard_range(num_classes, self.world_size, self.rank)
        self.num_sample = min(self.num_local, math.ceil(sample_rate * self.num_local))
        self.weight = nn.Parameter(init_rows(self.class_start, self.num_local, embedding_size,
                                             seed, init_std, device=device))
        self.optimizer: Any = None  # the head optimizer attaches itself
        self._pending_optimizer_state: Optional[dict] = None
        self._windows = 0  # samples drawn so far: seeds the next one (resumable)
        self._window: Optional[_Window] = None
        self.register_load_state_dict_pre_hook(PartialFC._pre_load_hook)

    def extra_repr(self) -> str:
        return (f"classes [{self.class_start}, {self.class_start + self.num_local}) of "
                f"{self.num_classes}, d={self.embedding_size}, sample_rate={self.sample_rate}, "
                f"num_sample={self.num_sample}, sparse_update={self.sparse_update}")

    # ---------------------------------------------------------------- windows and sampling
    def begin_window(self, local_labels: torch.Tensor) -> int:
        """Fix the class sample for the coming micro-steps from all of the window's labels.

        Collective: every rank calls it with its own labels of the whole window.

        Args:
            local_labels: this rank's labels of every micro-batch of the window.

        Returns:
            The window's global sample count, the default ``normalizer`` of its forwards.
        """
        if self._window is not None and self._window.index is not None \
                and self._window.leaf.grad is not None:
            raise RuntimeError("PartialFC.begin_window: the previous window's gradient was "
                               "never stepped (call the head optimizer's step() or end_window())")
        labels = local_labels.reshape(-1).long()
        labels = all_gather_labels(labels, group=self.group)
        self._check_labels(labels)
        self._window = self._open(labels, normalizer=labels.numel())
        return labels.numel()

    def end_window(self) -> None:
        """Close the window (the head optimizers call this after their step)."""
        self._window = None

    def sampled_classes(self) -> Optional[torch.Tensor]:
        """Global class ids of the open window's sample on this shard (``None``: all)."""
        if self._window is None or self._window.index is None:
            return None
        return self._window.index + self.class_start

    def _open(self, labels: torch.Tensor, normalizer: Optional[int]) -> _Window:
        index = self._sample(labels)
        leaf = self.weight if index is None else \
            self.weight.detach().index_select(0, index).requires_grad_(True)
        return _Window(index=index, leaf=leaf, normalizer=normalizer)

    @torch.no_grad()
    def _sample(self, labels: torch.Tensor) -> Optional[torch.Tensor]:
        """Sorted local rows: the positives of ``labels`` plus uniform negatives."""
        if self.num_sample >= self.num_local:
            return None
        local = labels - self.class_start
        positive = torch.unique(local[(local >= 0) & (local < self.num_local)])  # sorted
        self._windows += 1
        if positive.numel() >= self.num_sample:
            return positive
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed((self.seed * 0x9E3779B97F4A7C15 + self._windows * 0xBF58476D1CE4E5B9
                         + self.class_start) % 2 ** 63)
        keys = torch.rand(self.num_local, generator=gen, device=self.weight.device)
        keys[positive] = 2.0  # above every uniform draw: positives are always kept
        return torch.topk(keys, self.num_sample).indices.sort().values

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"PartialFC: labels must be in [0, {self.num_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")

    def _local_targets(self, labels: torch.Tensor, index: Optional[torch.Tensor]
                       ) -> torch.Tensor:
        """Each row's target column among this shard's (sampled) rows, or -1.

        Raises on every rank (the check is all-reduced, so no rank is left waiting in a
        collective) when a label of this batch is not in the window's sample.
        """
        local = labels - self.class_start
        mine = (local >= 0) & (local < self.num_local)
        if index is None:
            return torch.where(mine, local, torch.full_like(local, -1))
        pos = torch.searchsorted(index, local).clamp_(max=index.numel() - 1)
        found = mine & (index[pos] == local)
        lost = mine & ~found
        first = torch.where(lost, labels, torch.full_like(labels, -1)).max().reshape(1)
        all_reduce_(first, "max", self.group)
        if int(first) >= 0:
            raise ValueError(f"PartialFC: class {int(first)} is not in this window's sample; "
                             f"pass all of the window's labels to begin_window()")
        return torch.where(found, pos, torch.full_like(pos, -1))

    def _window_for(self, labels: torch.Tensor) -> _Window:
        """The open window, or a fresh per-batch one when no window holds gradients."""
        win = self._window
        if win is None or (win.normalizer is None and win.leaf.grad is None):
            win = self._window = self._open(labels, normalizer=None)
        return win

    # ------------------------------------------------------------------------- forward
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor,
                normalizer: Optional[float] = None) -> torch.Tensor:
        """Margin-softmax loss of the global batch (same value on every rank).

        Args:
            local_embeddings: this rank's ``(n, d)`` embeddings (any float dtype).
            local_labels: this rank's ``n`` global class ids.
            normalizer: divide the summed loss by this; default the window's global sample
                count, or this forward's gathered batch size outside ``begin_window``.

        Returns:
            The scalar loss (fp32, or fp64 for fp64 inputs).
        """
        if local_embeddings.dim() != 2 or local_embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"PartialFC: embeddings must be (n, {self.embedding_size}), got "
                             f"{tuple(local_embeddings.shape)}")
        labels = local_labels.reshape(-1).long()
        if labels.numel() != local_embeddings.shape[0]:
            raise ValueError(f"PartialFC: {labels.numel()} labels for "
                             f"{local_embeddings.shape[0]} embeddings")
        sizes = gather_sizes(labels.numel(), labels.device, self.group)
        embeddings = all_gather_rows(local_embeddings, sizes, group=self.group)
        labels = all_gather_labels(labels, sizes, self.group)
        if labels.numel() == 0:
            raise ValueError("PartialFC: the global batch is empty")
        self._check_labels(labels)
        win = self._window_for(labels)
        targets = self._local_targets(labels, win.index)
        if normalizer is None:
            normalizer = win.normalizer if win.normalizer is not None else labels.numel()
        if normalizer <= 0:
            raise ValueError(f"PartialFC: normalizer={normalizer} must be > 0")
        cos = F.linear(*_unit_rows(embeddings, win.leaf))
        return margin_softmax_ce(cos, targets, self.margin, normalizer, self.group)

    # ------------------------------------------------------------------- gradients
    def window_grad(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(sampled local rows or None for all, their gradient or None)``."""
        if self._window is not None:
            return self._window.index, self._window.leaf.grad
        return None, self.weight.grad

    def shard_grad(self) -> Optional[torch.Tensor]:
        """The gradient as a dense ``(num_local, d)`` tensor (zeros off the sample)."""
        index, grad = self.window_grad()
        if grad is None or index is None:
            return grad
        return torch.zeros_like(self.weight).index_copy_(0, index, grad)

    def grad_sq_norm(self) -> torch.Tensor:
        """This shard's squared gradient norm (at least fp32), to all-reduce for clipping.

        Sum it over ranks (the shards are disjoint) and add the replicated backbone's
        squared norm once: ``total = sqrt(backbone_sq + all_reduce_sum(head.grad_sq_norm()))``.
        """
        _, grad = self.window_grad()
        if grad is None:
            return torch.zeros((), dtype=torch.float32, device=self.weight.device)
        acc = torch.promote_types(grad.dtype, torch.float32)  # bf16 squares overflow early
        return torch.linalg.vector_norm(grad, dtype=acc) ** 2

    @torch.no_grad()
    def mul_grad_(self, factor: float) -> None:
        """Scale this shard's gradient in place (the clip coefficient)."""
        _, grad = self.window_grad()
        if grad is not None:
            grad.mul_(factor)

    def unscale_grad_(self, inv_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """Undo the fp16 loss scale on the window's gradient (the sampled rows' leaf or
        ``weight.grad``); ``found_inf`` becomes 1.0 on inf/NaN."""
        _, grad = self.window_grad()
        if grad is not None:
            self.unscale_tensors_([grad], inv_scale, found_inf)

    def zero_window_grad(self) -> None:
        """Drop the gradient of the open window's sampled rows."""
        if self._window is not None and self._window.index is not None:
            self._window.leaf.grad = None

    # ----------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        """Class range, sampling counter and the attached optimizer's rows (for reshard)."""
        optimizer = self.optimizer.row_state() if self.optimizer is not None \
            else self._pending_optimizer_state
        return {"format": STATE_FORMAT, "num_classes": self.num_classes,
                "embedding_size": self.embedding_size, "class_start": self.class_start,
                "num_local": self.num_local, "seed": self.seed, "windows": self._windows,
                "optimizer": optimizer}

    def _check_state(self, state: dict[str, Any]) -> None:
        mine = (self.num_classes, self.embedding_size, self.class_start, self.num_local)
        theirs = (state.get("num_classes"), state.get("embedding_size"),
                  state.get("class_start"), state.get("num_local"))
        if state.get("format") != STATE_FORMAT or mine != theirs:
            raise ValueError(f"PartialFC: state is for (classes, d, start, num_local)={theirs}, "
                             f"this rank holds {mine}: reshard(states, world, rank) first")

    def resharded_state(self, states: Any, world_size: int, rank: int) -> dict[str, Any]:
        """This rank's state at ``world_size`` from every old rank's (``shards.reshard``)."""
        return reshard(states, world_size, rank)

    @staticmethod
    def _pre_load_hook(module: "PartialFC", state_dict: dict, prefix: str, *_: Any) -> None:
        """Check the class range before ``load_state_dict`` copies any weight."""
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            module._check_state(extra)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore from a state of the same shard (``shards.reshard`` cuts other ones)."""
        self._check_state(state)
        self.seed, self._windows = state["seed"], state["windows"]
        self._window = None
        self._pending_optimizer_state = state.get("optimizer")
        if self.optimizer is not None and self._pending_optimizer_state is not None:
            self.optimizer.load_row_state(self._pending_optimizer_state)
            self._pending_optimizer_state = None
