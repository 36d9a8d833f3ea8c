"""val@FAR (insightface's ``calculate_val``) against hand-built sets and insightface's loops.

Hand-built sets whose per-fold thresholds, validation rates and FARs are derived by hand (an
interpolated threshold, an exact hit on a training FAR, the threshold-0 branch, unresolvable
sets); random sets against insightface's loops written out with scipy's B-spline (what
``interp1d(kind='slinear')`` built in scipy <= 1.8), exactly equal.
"""
from __future__ import annotations

import numpy as np
import pytest

from largebatch.face.val_far import VAL_THRESHOLDS, slinear, val_at_far
from tests.unit.face.test_verification import random_pairs

# ---- val@FAR (insightface's calculate_val) -------------------------------------------------

def val_set(genuine: list[float] = (0.2, 0.4, 0.6, 1.085, 1.2),
            impostor_at: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """100 pairs, 10 folds of 10: pairs 10f..10f+4 genuine (at ``genuine``), 10f+5..10f+9
    impostors; impostor i = 5f + k at 1.0005 + 0.01 i (grid midpoints, all distinct)."""
    d, same = np.zeros(100), np.zeros(100, dtype=bool)
    for f in range(10):
        d[10 * f:10 * f + 5], same[10 * f:10 * f + 5] = genuine, True
        i = 5 * f + np.arange(5)
        d[10 * f + 5:10 * f + 10] = 1.0005 + 0.01 * i if impostor_at is None else impostor_at
    return d, same


def test_val_at_far_interpolated_threshold_hand_computed():
    # FAR 0.1 on 45 training impostors: between 4/45 and 5/45, halfway -> the threshold is
    # the 5th smallest training impostor (+-1e-12). Fold 0 trains on impostors 5..49: 5th is
    # i = 9 (1.0905); every other fold trains on 0..4 first: 5th is i = 4 (1.0405).
    # Held out: fold 0 accepts genuines < 1.0905 (0.2, 0.4, 0.6, 1.085: 4/5) and all its
    # impostors (i = 0..4 < 1.0905: FAR 1); folds 1-9 accept 0.2, 0.4, 0.6 (3/5), no impostor.
    # val = (0.8 + 9 x 0.6) / 10 = 0.62, std = sqrt((0.18^2 + 9 x 0.02^2) / 10) = 0.06,
    # far = 1 / 10 = 0.1.
    v = val_at_far(*val_set(), "0.1")
    assert v.note is None and v.far_target == "0.1"
    assert np.allclose(v.fold_thresholds, [1.0905] + [1.0405] * 9, rtol=0, atol=1e-12)
    assert v.fold_val == (0.8,) + (0.6,) * 9 and v.fold_far == (1.0,) + (0.0,) * 9
    assert v.val == pytest.approx(0.62, abs=1e-15) and v.std == pytest.approx(0.06, abs=1e-15)
    assert v.far == pytest.approx(0.1, abs=1e-15)


def test_val_at_far_exact_hit_takes_the_last_threshold_of_the_run():
    # FAR 0.2 = 9/45 exactly (in floating point too): far_train equals the target on a whole
    # run of thresholds (between the 9th and 10th training impostor); scipy's spline returns
    # the LAST threshold of that run, t = (10th impostor) - 0.0005: fold 0 (impostors 5..49,
    # 10th i = 14) and fold 1 (0..4, 10..49: 10th i = 14) -> 1.14; folds 2-9 (10th i = 9) ->
    # 1.09. The genuine at 1.085 is accepted in every fold (the run's FIRST threshold, 1.081,
    # would reject it in folds 2-9): val 0.8 everywhere; folds 0 and 1 accept all their
    # impostors (i <= 9 < 1.14), the others none: far = 2 / 10.
    v = val_at_far(*val_set(), 0.2)
    assert np.allclose(v.fold_thresholds, [1.14, 1.14] + [1.09] * 8, rtol=0, atol=1e-12)
    assert v.fold_val == (0.8,) * 10 and (v.val, v.std) == (0.8, 0.0)
    assert v.fold_far == (1.0, 1.0) + (0.0,) * 8 and v.far == pytest.approx(0.2, abs=1e-15)


def test_val_at_far_threshold_zero_and_unresolvable_sets():
    # Every impostor at 3.9995, past the last threshold 3.999: far_train is 0 everywhere, below
    # the target: insightface's threshold 0.0 accepts nothing.
    v = val_at_far(*val_set(impostor_at=3.9995), "0.1")
    assert v.fold_thresholds == (0.0,) * 10 and (v.val, v.std, v.far) == (0.0, 0.0, 0.0)
    # 45 training impostors cannot resolve FAR 1e-3: None, and why
    v = val_at_far(*val_set(), "1e-3")
    assert (v.val, v.std, v.far, v.fold_thresholds) == (None, None, None, ())
    assert v.note == ("FAR 1e-3 needs >= 1000 impostor pairs in every fold's training part, "
                      "the set has 45")
    d, same = val_set()
    same[:10] = False  # fold 0 holds no genuine pair: insightface would divide by zero
    assert val_at_far(d, same, "0.1").note == ("held-out fold 0 has 0 genuine and 10 impostor "
                                               "pairs (val@FAR needs both in every fold)")


def reference_val(dist: np.ndarray, issame: np.ndarray, far_target: float) -> tuple:
    """insightface's calculate_val / calculate_val_far as written there (loops over folds and
    thresholds, np.less), with interp1d(kind='slinear') as scipy <= 1.8 built it: the degree-1
    B-spline on knots [x0, x..., x_last] (scipy >= 1.9 refuses repeated x)."""
    from scipy import interpolate
    thresholds = np.arange(0, 4, 0.001)
    folds = np.array_split(np.arange(len(dist)), 10)
    val, far, chosen = np.zeros(10), np.zeros(10), np.zeros(10)
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(dist)), test)
        far_train = np.zeros(len(thresholds))
        for j, t in enumerate(thresholds):
            far_train[j] = _val_far(t, dist[train], issame[train])[1]
        if np.max(far_train) >= far_target:
            spline = interpolate.BSpline(np.r_[far_train[0], far_train, far_train[-1]],
                                         thresholds, 1)
            chosen[f] = float(spline(far_target))
        else:
            chosen[f] = 0.0
        val[f], far[f] = _val_far(chosen[f], dist[test], issame[test])
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far)), tuple(chosen)


def _val_far(t: float, dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    predict = np.less(dist, t)
    ta = np.sum(np.logical_and(predict, issame))
    fa = np.sum(np.logical_and(predict, np.logical_not(issame)))
    return float(ta) / float(np.sum(issame)), float(fa) / float(np.sum(~issame))


@pytest.mark.parametrize("n, seed, far", [(3000, 5, "1e-3"), (1000, 6, "0.02")])
def test_val_at_far_equals_insightface_loops(n, seed, far):
    pytest.importorskip("scipy")
    d, same = random_pairs(n, seed)
    if n == 1000:  # 50 impostors per fold: FAR 0.02 x 450 = 9 exactly (exact hits)
        same = np.arange(n) % 2 == 0
        d = d.round(2)  # ties with the grid and between pairs
    v = val_at_far(d, same, far)
    assert (v.val, v.std, v.far, v.fold_thresholds) == reference_val(d, same, float(far))
    assert 0 < v.val < 1 and v.note is None


def test_slinear_is_scipys_degree_one_spline():
    pytest.importorskip("scipy")
    from scipy import interpolate
    rng = np.random.default_rng(7)
    for n in (50, 450, 2700):
        imp = np.sort(rng.normal(1.7, 0.3, n).clip(0, 4).round(3))
        x = np.searchsorted(imp, VAL_THRESHOLDS, side="left") / float(n)
        spline = interpolate.BSpline(np.r_[x[0], x, x[-1]], VAL_THRESHOLDS, 1)
        for v in (1e-3, 0.01, 0.1, 0.5, float(x[1234]), float(x.max())):
            if v <= x.max():
                assert slinear(x, VAL_THRESHOLDS, v) == float(spline(v))
