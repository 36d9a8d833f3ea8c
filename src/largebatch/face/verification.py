"""Face verification as the field reports it (LFW protocol, insightface's ``verification.py``).

* Embeddings: ``flip_embed`` sums the backbone's embedding of an image and of its horizontal
  flip, then L2-normalises the sum (insightface sums before normalising, so the two views are
  weighted by their norms).
* 10-fold accuracy (``ten_fold``): on the SQUARED L2 distance of the two normalised
  embeddings of a pair (in ``[0, 4]``), a pair is called "same" when ``dist < t`` (strict, as
  ``np.less`` there). The pairs are cut, in order and unshuffled, into ``n_folds`` contiguous
  folds of sklearn ``KFold``'s sizes (``n // k`` each, the first ``n % k`` one larger). For
  each fold the threshold ``t`` out of ``np.arange(0, 4, 0.01)`` with the best accuracy on
  the other nine folds is chosen (ties: the smallest such ``t``, as ``np.argmax`` returns the
  first maximum) and the fold's accuracy at that ``t`` is its score. Reported: the mean of the
  ten fold accuracies, their ``np.std`` (ddof 0), the mean chosen threshold and each fold's.
* TAR at FAR (``tar_at_far``): on the whole pair set, see its docstring. It is REPORTED
  (``verification_metrics``) only where the set can resolve that FAR: at least ``1 / FAR``
  impostor pairs (``far x N >= 1``, i.e. one false accept allowed). Below that the figure
  would be the TAR at ZERO false accepts relabelled as "FAR 1e-4" (e.g. 300 impostors cannot
  tell a FAR of 1e-4 from one of 3e-3): the value is ``None`` (``null`` in metrics.jsonl and
  summary.json) and ``<key>_note`` says why.
* insightface's ``val@FAR`` (``calculate_val``) is in ``largebatch.face.val_far``.

Everything here is numpy/torch (no sklearn); distances are float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: insightface's accuracy thresholds on the squared distance (float64 values of np.arange).
THRESHOLDS = np.arange(0, 4, 0.01)
#: The false accept rates reported as ``tar_at_far_<far>``.
FARS = ("1e-3", "1e-4")


@dataclass(frozen=True)
class TenFold:
    """The 10-fold verification figures.

    Attributes:
        acc: mean of the fold accuracies.
        std: their standard deviation (``np.std``, ddof 0).
        threshold: mean of the thresholds chosen on each fold's nine training folds.
        fold_acc: the accuracy of each held-out fold.
        fold_thresholds: the threshold chosen for each held-out fold (on the other folds).
    """

    acc: float
    std: float
    threshold: float
    fold_acc: tuple[float, ...]
    fold_thresholds: tuple[float, ...] = ()


def fold_bounds(n: int, n_folds: int = 10) -> list[tuple[int, int]]:
    """``[start, end)`` of each fold of sklearn's unshuffled ``KFold`` over ``n`` items."""
    if n_folds < 2 or n < n_folds:
        raise ValueError(f"{n_folds}-fold verification needs at least {n_folds} pairs and "
                         f"2 folds (got {n} pairs)")
    sizes = [n // n_folds + (1 if f < n % n_folds else 0) for f in range(n_folds)]
    ends = np.cumsum(sizes).tolist()
    return [(e - s, e) for s, e in zip(sizes, ends)]


def as_numpy(values: torch.Tensor | np.ndarray | Sequence, dtype: type) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values).astype(dtype).reshape(-1)


def _correct_counts(d: np.ndarray, same: np.ndarray) -> np.ndarray:
    """How many pairs ``dist < THRESHOLDS[j]`` classifies right, for every ``j``.

    ``searchsorted(side='right')`` gives each pair the first threshold index ``i`` with
    ``THRESHOLDS[i] > d`` (the same float64 comparison as ``d < t``; NaN sorts past the end,
    never "same", as ``np.less`` says); then a genuine pair is right for ``j >= i`` and an
    impostor for ``j < i``: O(n + thresholds), not an (n, thresholds) table.
    """
    first = np.searchsorted(THRESHOLDS, d, side="right")
    m = len(THRESHOLDS) + 1
    genuine_right = np.cumsum(np.bincount(first[same], minlength=m))[:-1]
    impostor_wrong = np.cumsum(np.bincount(first[~same], minlength=m))[:-1]
    return genuine_right + (np.count_nonzero(~same) - impostor_wrong)


def ten_fold(dist: torch.Tensor | np.ndarray | Sequence[float],
             issame: torch.Tensor | np.ndarray | Sequence[bool],
             n_folds: int = 10) -> TenFold:
    """insightface's k-fold verification accuracy (see the module docstring for the rule).

    Args:
        dist: squared L2 distance of each pair's normalised embeddings, in pair order.
        issame: whether each pair is of one identity (bool or 0/1).
        n_folds: number of folds (10 in the LFW protocol).

    Returns:
        The mean fold accuracy, its std, the mean chosen threshold and each fold's accuracy.

    Raises:
        ValueError: fewer pairs than folds, or lengths that differ.
    """
    d, same = as_numpy(dist, np.float64), as_numpy(issame, np.float64) > 0.5
    if len(d) != len(same):
        raise ValueError(f"{len(d)} distances but {len(same)} issame labels")
    bounds = fold_bounds(len(d), n_folds)
    per_fold = np.stack([_correct_counts(d[s:e], same[s:e]) for s, e in bounds])
    total = per_fold.sum(0)  # integer counts: argmax over them == argmax over count / n
    acc, chosen = np.zeros(n_folds), np.zeros(n_folds)
    for f, (s, e) in enumerate(bounds):
        best = int(np.argmax(total - per_fold[f]))  # the first maximum, as np.argmax there
        chosen[f] = THRESHOLDS[best]
        acc[f] = float(per_fold[f, best]) / float(e - s)
    return TenFold(acc=float(np.mean(acc)), std=float(np.std(acc)),
                   threshold=float(np.mean(chosen)), fold_acc=tuple(acc.tolist()),
                   fold_thresholds=tuple(chosen.tolist()))


def tar_at_far(dist: torch.Tensor | np.ndarray | Sequence[float],
               issame: torch.Tensor | np.ndarray | Sequence[bool], far: float | str) -> float:
    """True accept rate at a false accept rate of at most ``far``, over the WHOLE pair set.

    A pair is accepted when ``dist < t`` (as in ``ten_fold``). The threshold is the most
    permissive one whose FAR over all impostor pairs is ``<= far``: with ``N`` impostors,
    ``k = floor(far * N)`` false accepts are allowed (``far`` taken as the decimal it is
    written as, so ``1e-3 * 3000`` allows exactly 3), and ``t`` is the ``(k+1)``-th smallest
    impostor distance (``+inf`` when ``k >= N``). TAR is the share of genuine pairs with
    ``dist < t``.

    Ties: impostors tied with that ``(k+1)``-th one are all rejected (so fewer than ``k``
    false accepts can result), and a genuine pair at exactly ``t`` is rejected too: a
    threshold cannot separate equal distances, so it never buys TAR with a FAR above
    ``far``. With ``far * N < 1`` (e.g. FAR 1e-4 with under 10,000 impostors) this means zero
    false accepts: ``t`` is the smallest impostor distance. (insightface's IJB evaluation
    instead reads the ROC point whose FAR is NEAREST to the target, which may exceed it.)

    Args:
        dist: squared L2 distance per pair.
        issame: whether each pair is genuine.
        far: the target false accept rate, e.g. ``1e-3`` or ``"1e-4"``.

    Raises:
        ValueError: no genuine or no impostor pairs, or lengths that differ.
    """
    d, same = as_numpy(dist, np.float64), as_numpy(issame, np.float64) > 0.5
    if len(d) != len(same):
        raise ValueError(f"{len(d)} distances but {len(same)} issame labels")
    genuine, impostor = d[same], np.sort(d[~same])
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs (got {len(genuine)} "
                         f"genuine, {len(impostor)} impostor)")
    # Fraction(str(...)): the decimal as written, not its binary float (1e-3 is 0.0010000..2).
    k = math.floor(Fraction(str(far)) * len(impostor))
    t = impostor[k] if k < len(impostor) else math.inf
    return float(np.count_nonzero(genuine < t)) / float(len(genuine))


def far_resolution_note(impostors: int, far: float | str, what: str = "impostor pairs"
                        ) -> str | None:
    """Why ``impostors`` impostor pairs cannot resolve a FAR of ``far``, or None if they can.

    A FAR of ``far`` is resolved when at least one false accept is allowed: ``far x N >= 1``
    (``far`` as the decimal it is written as: ``1e-3 x 1000 == 1`` exactly).
    """
    if Fraction(str(far)) * impostors >= 1:
        return None
    need = math.ceil(1 / Fraction(str(far)))
    return f"FAR {far} needs >= {need} {what}, the set has {impostors}"


def metric_keys(name: str | None = None) -> tuple[str, ...]:
    """The names of a set's figures: acc, std, then TAR at each of ``FARS``.

    ``None`` (the primary set): ``verification_acc``, ``verification_std``,
    ``tar_at_far_1e-3``, ``tar_at_far_1e-4``; a set NAME: ``NAME_acc``, ``NAME_std``,
    ``NAME_tar_at_far_1e-3``, ``NAME_tar_at_far_1e-4``.
    """
    acc = "verification" if name is None else name
    tar = "" if name is None else f"{name}_"
    return (f"{acc}_acc", f"{acc}_std", *(f"{tar}tar_at_far_{far}" for far in FARS))


def verification_metrics(dist: torch.Tensor | np.ndarray, issame: torch.Tensor | np.ndarray,
                         name: str | None = None) -> dict[str, float | str | None]:
    """10-fold accuracy, its std and TAR at ``FARS`` under ``metric_keys(name)``.

    A TAR the set cannot resolve (fewer than ``1 / FAR`` impostor pairs) is ``None``, with
    ``<key>_note`` (a string) saying so; the other keys are always floats.
    """
    tf = ten_fold(dist, issame)
    impostors = int(np.count_nonzero(as_numpy(issame, np.float64) <= 0.5))
    acc_key, std_key, *tar_keys = metric_keys(name)
    out: dict[str, float | str | None] = {acc_key: tf.acc, std_key: tf.std}
    for key, far in zip(tar_keys, FARS):
        note = far_resolution_note(impostors, far)
        out[key] = None if note else tar_at_far(dist, issame, far)
        if note:
            out[f"{key}_note"] = note
    return out


def flip_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised ``model(x) + model(flip_W(x))`` in fp32, as insightface embeds a test image.

    Args:
        model: maps ``(n, 3, H, W)`` images to ``(n, d)`` embeddings (may run under autocast;
            its outputs are cast to fp32 before the sum).
        x: ``(n, 3, H, W)`` images.

    Returns:
        ``(n, d)`` unit-norm fp32 embeddings.
    """
    # One forward over both views: half the kernel launches, the same per-sample result for
    # a backbone without batch statistics (BN is in eval mode here).
    both = model(torch.cat([x, torch.flip(x, dims=[-1])])).float()
    n = x.shape[0]
    return F.normalize(both[:n] + both[n:], dim=1)


def squared_distances(emb: torch.Tensor) -> torch.Tensor:
    """``(n, 2, d)`` pair embeddings -> ``(n,)`` float64 squared L2 distances."""
    e = emb.double()
    return ((e[:, 0] - e[:, 1]) ** 2).sum(1)
