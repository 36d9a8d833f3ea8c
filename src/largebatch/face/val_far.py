"""insightface's ``val@FAR``: the validation rate at the threshold that gives a target FAR.

What ``calculate_val`` in insightface's ``recognition/arcface_torch/eval/verification.py``
computes (``evaluate`` calls it with ``far_target=1e-3``), step by step:

1. Squared L2 distances of the pairs' normalised embeddings; a pair is accepted when
   ``dist < t`` (``np.less``). Thresholds ``np.arange(0, 4, 0.001)`` (``VAL_THRESHOLDS``).
2. The pairs are cut into 10 contiguous, unshuffled folds (sklearn ``KFold``: the first
   ``n % 10`` folds one pair larger; ``verification.fold_bounds``).
3. Per fold: on the OTHER nine folds, the false accept rate ``far_train[j]`` = (impostors with
   ``dist < t_j``) / (impostors) at every threshold. If ``max(far_train) >= far_target``, the
   fold's threshold is ``scipy.interpolate.interp1d(far_train, thresholds,
   kind='slinear')(far_target)``, else ``0.0`` (nothing accepted).
4. On the held-out fold at that threshold: ``val`` = (genuine pairs accepted) / (genuine pairs),
   ``far`` = (impostors accepted) / (impostors).
5. Reported: ``mean(val)``, ``std(val)`` (ddof 0), ``mean(far)``.

Step 3 needs care: ``far_train`` is a step function of the threshold, so it repeats values.
scipy <= 1.8 interpolated such an ``x`` as a degree-1 B-spline with knots ``[x0, x, x_last]``
(what ``make_interp_spline(k=1)`` returned before checking for duplicates); scipy >= 1.9
raises ``ValueError: Expect x to not have duplicates`` there, so insightface's own code no
longer runs on a current scipy (scipy issue #21550). ``slinear`` here evaluates that spline
exactly as scipy's de Boor code did (the last knot ``<= v`` opens the interval; within it
``y_j * (w * (x_j+1 - v)) + y_j+1 * (w * (v - x_j))`` with ``w = 1 / (x_j+1 - x_j)``; a
degenerate last interval gives 0), without scipy: equal to ``scipy.interpolate.BSpline(
[x0, *x, x_last], y, 1)(v)`` bit for bit (tested).

Honesty, as for TAR@FAR: the figure is reported only when every fold's training part holds at
least ``1 / far_target`` impostor pairs (the threshold is then placed between observed false
accepts, not extrapolated below the first one), and every held-out fold holds a genuine and an
impostor pair (insightface divides by zero otherwise). Else ``val`` is None and ``note`` says
why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from largebatch.face.verification import as_numpy, far_resolution_note, fold_bounds

#: insightface's val@FAR thresholds on the squared distance (``np.arange(0, 4, 0.001)``).
VAL_THRESHOLDS = np.arange(0, 4, 0.001)


@dataclass(frozen=True)
class ValAtFar:
    """insightface's val@FAR of one set (``val``/``std``/``far`` None when not resolvable).

    Attributes:
        far_target: the target FAR as given (e.g. ``"1e-3"``).
        val: mean over the folds of the held-out validation rate (TAR).
        std: its standard deviation over the folds (``np.std``).
        far: mean over the folds of the held-out false accept rate actually obtained.
        fold_val: each held-out fold's validation rate.
        fold_far: each held-out fold's false accept rate.
        fold_thresholds: each fold's threshold (interpolated on the other folds).
        note: why the figure is not reported (None when it is).
    """

    far_target: str
    val: float | None
    std: float | None
    far: float | None
    fold_val: tuple[float, ...] = ()
    fold_far: tuple[float, ...] = ()
    fold_thresholds: tuple[float, ...] = ()
    note: str | None = None


def slinear(x: np.ndarray, y: np.ndarray, v: float) -> float:
    """``interp1d(x, y, kind='slinear')(v)`` as scipy <= 1.8 computed it (see the module
    docstring); ``x`` non-decreasing (repeats allowed), ``x[0] <= v <= x[-1]``."""
    n = len(x)
    j = min(int(np.searchsorted(x, v, side="right")) - 1, n - 2)
    xa, xb = float(x[j]), float(x[j + 1])
    if xb == xa:  # only the last interval can be empty here: scipy's basis is 0 there
        return 0.0
    w = 1.0 / (xb - xa)
    return float(y[j] * (w * (xb - v)) + y[j + 1] * (w * (v - xa)))


def _counts_below(sorted_d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """How many of ``sorted_d`` are ``< t`` (strict, as ``np.less``; NaN never counts)."""
    return np.searchsorted(sorted_d, t, side="left")


def _fold_threshold(d: np.ndarray, same: np.ndarray, train: np.ndarray,
                    far_target: float) -> float:
    """Step 3 of the module docstring on the training pairs ``train`` (a boolean mask)."""
    impostors = np.sort(d[train & ~same])
    far_train = _counts_below(impostors, VAL_THRESHOLDS) / float(len(impostors))
    if np.max(far_train) >= far_target:
        return slinear(far_train, VAL_THRESHOLDS, far_target)
    return 0.0


def _unresolved(d: np.ndarray, same: np.ndarray, bounds: list[tuple[int, int]],
                far: str) -> str | None:
    """Why the folds cannot resolve ``far`` (see the module docstring), or None."""
    total_imp = int(np.count_nonzero(~same))
    for f, (s, e) in enumerate(bounds):
        genuine, imp = int(np.count_nonzero(same[s:e])), int(np.count_nonzero(~same[s:e]))
        if genuine == 0 or imp == 0:
            return (f"held-out fold {f} has {genuine} genuine and {imp} impostor pairs "
                    f"(val@FAR needs both in every fold)")
    fewest = min(total_imp - int(np.count_nonzero(~same[s:e])) for s, e in bounds)
    return far_resolution_note(fewest, far, "impostor pairs in every fold's training part")


def val_at_far(dist: torch.Tensor | np.ndarray | Sequence[float],
               issame: torch.Tensor | np.ndarray | Sequence[bool], far: float | str = "1e-3",
               n_folds: int = 10) -> ValAtFar:
    """insightface's ``calculate_val`` (see the module docstring), or None with a note.

    Args:
        dist: squared L2 distance of each pair's normalised embeddings, in pair order.
        issame: whether each pair is genuine.
        far: the target FAR (insightface reports ``1e-3``).
        n_folds: number of folds (10).

    Raises:
        ValueError: fewer pairs than folds, or lengths that differ.
    """
    d, same = as_numpy(dist, np.float64), as_numpy(issame, np.float64) > 0.5
    if len(d) != len(same):
        raise ValueError(f"{len(d)} distances but {len(same)} issame labels")
    bounds = fold_bounds(len(d), n_folds)
    note = _unresolved(d, same, bounds, str(far))
    if note:
        return ValAtFar(str(far), None, None, None, note=note)
    target = float(far)
    val, fars, thresholds = np.zeros(n_folds), np.zeros(n_folds), np.zeros(n_folds)
    for f, (s, e) in enumerate(bounds):
        train = np.ones(len(d), dtype=bool)
        train[s:e] = False
        t = thresholds[f] = _fold_threshold(d, same, train, target)
        test_d, test_same = d[s:e], same[s:e]
        accepted = np.less(test_d, t)
        val[f] = float(np.count_nonzero(accepted & test_same)) / float(
            np.count_nonzero(test_same))
        fars[f] = float(np.count_nonzero(accepted & ~test_same)) / float(
            np.count_nonzero(~test_same))
    return ValAtFar(str(far), float(np.mean(val)), float(np.std(val)), float(np.mean(fars)),
                    tuple(val.tolist()), tuple(fars.tolist()), tuple(thresholds.tolist()))
