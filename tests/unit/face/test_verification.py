"""Verification as insightface reports it, against hand-computed values and plain references.

* ``ten_fold``: tiny inputs whose fold accuracies, std and thresholds are derived by hand;
  random 6000/6007-pair sets against a reference written here as insightface's loops are
  (per fold, per threshold, ``np.less`` + counts; folds by ``np.array_split``), exactly equal.
* ``tar_at_far``: a hand case with a tie at the boundary; random sets against a brute force
  over every possible threshold (max TAR subject to FAR <= target, in exact fractions).
* Honest TAR@FAR: ``verification_metrics`` reports None (with a note) below 1/FAR impostors;
  ``FaceTask.metric`` refuses such a metric as the target or plateau metric.
* ``val_at_far``: tests/unit/face/test_val_far.py.
* ``flip_embed``: a model where the flip and the sum-before-normalise both matter.
* ``FaceTask.evaluate`` on 2 real gloo ranks (DDP-wrapped model, a PairLoader set and an
  unevenly sharded second set) equals the single-process evaluate of the same model.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from largebatch.config import ConfigError, load_config
from largebatch.face.verification import (fold_bounds, flip_embed, tar_at_far, ten_fold,
                                          verification_metrics)
from largebatch.tasks.face import FaceTask, pair_distances
from tests._launch import spawn
from tests.unit.tasks._face_runs import TINY

# ---- ten_fold: hand-computed -------------------------------------------------------------
THRESH_051 = float(np.arange(0, 4, 0.01)[51])  # 0.51 as np.arange makes it


def test_ten_fold_hand_computed_twenty_pairs():
    # 20 pairs -> 10 folds of 2 (pairs 2f, 2f+1). Genuine at 0.505, impostor at 1.505, except
    # fold 9's genuine pair at 2.005 (on the wrong side of any useful threshold).
    d = [0.505, 1.505] * 9 + [2.005, 1.505]
    same = [1, 0] * 10
    # Held-out fold f < 9: the nine train folds include fold 9; every t in (0.505, 1.505],
    # i.e. 0.51 ... 1.50, gets 17/18 right (only the 2.005 genuine is wrong), t > 2.005 accepts
    # all 9 impostors: argmax takes the FIRST best, t = 0.51; the fold scores 2/2 = 1.
    # Held-out fold 9: train folds are perfect for 0.51 ... 1.50 -> t = 0.51; the fold's
    # genuine 2.005 is rejected (wrong), its impostor rejected (right): 1/2.
    # mean = (9 x 1 + 0.5) / 10 = 0.95; std = sqrt((9 x 0.05^2 + 0.45^2) / 10)
    #      = sqrt((0.0225 + 0.2025) / 10) = sqrt(0.0225) = 0.15; mean threshold 0.51.
    r = ten_fold(d, same)
    assert r.fold_acc == (1.0,) * 9 + (0.5,)
    assert r.fold_thresholds == (THRESH_051,) * 10
    assert r.acc == pytest.approx(0.95, abs=1e-15)
    assert r.std == pytest.approx(0.15, abs=1e-15)
    assert r.threshold == pytest.approx(0.51, abs=1e-15)


def test_ten_fold_hand_computed_strict_threshold_and_uneven_folds():
    # 13 pairs: sklearn KFold sizes 2,2,2,1,...,1 (the first 13 % 10 = 3 folds one larger).
    assert fold_bounds(13) == [(0, 2), (2, 4), (4, 6)] + [(i, i + 1) for i in range(6, 13)]
    assert fold_bounds(6000) == [(600 * f, 600 * (f + 1)) for f in range(10)]
    # Genuine pairs at EXACTLY 0.5 == THRESHOLDS[50]: "dist < t" (strict) first accepts them at
    # t = 0.51; impostors at 0.8. Every fold's train set prefers the first t in (0.5, 0.8]:
    # 0.51, and every pair is then right: acc 1, std 0, threshold 0.51.
    d = [0.5, 0.8] * 6 + [0.5]
    same = [1, 0] * 6 + [1]
    r = ten_fold(d, same)
    assert (r.acc, r.std) == (1.0, 0.0)
    assert r.threshold == pytest.approx(0.51, abs=1e-15)
    # Swap pair 2 to a genuine at 0.8 and pair 3 to an impostor at 0.5. Regions: A = t <= 0.5
    # (accept nothing: impostors right), B = 0.51 ... 0.80 (accept 0.5: genuines at 0.5 and
    # impostors at 0.8 right), C = t > 0.8 (accept all: genuines right). Held out:
    #  F1 = {2, 3}: train = 6 genuine@0.5 + 5 impostor@0.8: A 5, B 11, C 6 -> 0.51; test: pair
    #     2 rejected, pair 3 accepted: 0/2 (with other fold sizes, F1 would not be {2, 3}).
    #  F0 = {0, 1}: train gen@.5 5, gen@.8 1, imp@.8 4, imp@.5 1: A 5, B 9, C 6 -> 0.51: 2/2.
    #  F2 = {4, 5}: the same counts -> 2/2. Singles F3..F9: A 5-6, B 10, C 6-7 -> 0.51: 1/1.
    # acc = 9/10 = 0.9, std = sqrt((9 x 0.1^2 + 0.9^2) / 10) = sqrt(0.09) = 0.3, mean t 0.51.
    d[2], d[3] = 0.8, 0.5
    r = ten_fold(d, same)
    assert r.fold_acc == (1.0, 0.0) + (1.0,) * 8
    assert r.acc == pytest.approx(0.9, abs=1e-15)
    assert r.std == pytest.approx(0.3, abs=1e-15)
    assert r.threshold == pytest.approx(0.51, abs=1e-15)


def test_ten_fold_refuses_fewer_pairs_than_folds():
    with pytest.raises(ValueError, match="at least 10 pairs"):
        ten_fold([0.1] * 9, [1] * 9)


# ---- ten_fold: against insightface-style loops ---------------------------------------------

def reference_ten_fold(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """insightface's calculate_roc/calculate_accuracy structure, written out plainly."""
    thresholds = np.arange(0, 4, 0.01)
    folds = np.array_split(np.arange(len(dist)), 10)  # first n % 10 folds one larger
    accuracy = np.zeros(10)
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(len(dist)), test)
        acc_train = np.zeros(len(thresholds))
        for j, t in enumerate(thresholds):
            acc_train[j] = _accuracy(t, dist[train], issame[train])
        best = np.argmax(acc_train)
        accuracy[f] = _accuracy(thresholds[best], dist[test], issame[test])
    return float(np.mean(accuracy)), float(np.std(accuracy))


def _accuracy(t: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict = np.less(dist, t)
    tp = np.sum(np.logical_and(predict, issame))
    tn = np.sum(np.logical_and(~predict, ~issame))
    return float(tp + tn) / dist.size


def random_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping genuine/impostor distances in [0, 4]; a fifth exactly on a threshold."""
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    d = np.where(same, rng.normal(1.0, 0.35, n), rng.normal(1.6, 0.35, n)).clip(0, 4)
    on_grid = rng.random(n) < 0.2
    d[on_grid] = np.arange(0, 4, 0.01)[rng.integers(60, 180, on_grid.sum())]
    return d, same


@pytest.mark.parametrize("n,seed", [(6000, 0), (6007, 1)])
def test_ten_fold_equals_reference_loops(n, seed):
    d, same = random_pairs(n, seed)
    acc, std = reference_ten_fold(d, same)
    r = ten_fold(torch.from_numpy(d), torch.from_numpy(same))
    assert (r.acc, r.std) == (acc, std)
    assert 0.7 < acc < 0.9 and std > 0  # a non-trivial case: the folds disagree


# ---- TAR at FAR ----------------------------------------------------------------------------

def test_tar_at_far_hand_computed_with_a_tie():
    # 2000 impostors: FAR 1e-3 allows floor(2) = 2 false accepts, 1e-4 allows 0.
    imp = [0.2, 0.4, 0.4] + [3.0] * 1997
    gen = [0.1, 0.3, 0.4, 0.5]
    d = np.array(gen + imp)
    same = np.array([1] * 4 + [0] * 2000)
    # 1e-3: t = 3rd smallest impostor = 0.4; accepting d < 0.4 takes 1 impostor (the tie at
    # 0.4 cannot be split: accepting it would mean 3 > 2), genuines 0.1, 0.3: TAR 2/4.
    assert tar_at_far(d, same, 1e-3) == 0.5
    # 1e-4: t = 0.2 (no false accept): genuine 0.1 only: 1/4.
    assert tar_at_far(d, same, 1e-4) == 0.25
    # FAR 1e-3 of 3000 impostors is exactly 3 (not floor(2.9999...)): t = the 4th smallest.
    d3 = np.array([0.5] + [0.1, 0.2, 0.3] + [0.6] * 2997)
    assert tar_at_far(d3, np.array([1] + [0] * 3000), 1e-3) == 1.0
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far([0.1, 0.2], [1, 1], 1e-3)


def brute_tar(d: np.ndarray, same: np.ndarray, far: str) -> float:
    """Max TAR over every distinct accept set {d < t}, subject to FAR <= far (exact)."""
    gen, imp = d[same], d[~same]
    best = 0.0
    for t in [*np.unique(d).tolist(), math.inf]:
        if Fraction(int((imp < t).sum()), len(imp)) <= Fraction(far):
            best = max(best, float((gen < t).sum()) / len(gen))
    return best


@pytest.mark.parametrize("n,seed", [(6000, 2), (24000, 3)])
def test_tar_at_far_equals_brute_force(n, seed):
    d, same = random_pairs(n, seed)
    d = d.round(3)  # many ties, also between genuine and impostor distances
    for far in ("1e-3", "1e-4"):
        got = tar_at_far(d, same, float(far))
        assert got == brute_tar(d, same, far)
    assert tar_at_far(d, same, 1e-3) > tar_at_far(d, same, 1e-4) > 0


# ---- honest TAR@FAR in the reported metrics -------------------------------------------------

def test_tar_is_reported_only_with_one_over_far_impostors():
    # 1000 impostors: FAR 1e-3 resolved (one false accept allowed), 1e-4 not (0.1 of one).
    d, same = random_pairs(2000, 4)
    same[:] = np.arange(2000) % 2 == 0
    m = verification_metrics(d, same, "lfw")
    assert m["lfw_tar_at_far_1e-3"] == tar_at_far(d, same, "1e-3")
    assert m["lfw_tar_at_far_1e-4"] is None
    assert m["lfw_tar_at_far_1e-4_note"] == ("FAR 1e-4 needs >= 10000 impostor pairs, the set "
                                             "has 1000")
    assert "lfw_tar_at_far_1e-3_note" not in m
    tf = ten_fold(d, same)
    assert (m["lfw_acc"], m["lfw_std"]) == (tf.acc, tf.std)
    # 999 impostors: 1e-3 x 999 < 1 -> not reported either; primary-set key names
    m = verification_metrics(d[:-1], same[:-1])  # the last pair is an impostor
    assert m["tar_at_far_1e-3"] is None and "the set has 999" in m["tar_at_far_1e-3_note"]
    assert list(m) == ["verification_acc", "verification_std", "tar_at_far_1e-3",
                       "tar_at_far_1e-3_note", "tar_at_far_1e-4", "tar_at_far_1e-4_note"]


def test_a_metric_that_can_be_null_is_never_the_target_or_plateau_metric(tmp_path):
    import pickle
    task = FaceTask(load_config(TINY))  # 600 held-out pairs: 300 impostors
    with pytest.raises(ConfigError) as exc:
        task.metric("tar_at_far_1e-3", "train.target_metric")
    assert str(exc.value) == (
        "train.target_metric='tar_at_far_1e-3' can be null: FAR 1e-3 needs >= 1000 impostor "
        "pairs, the set has 300; follow an accuracy (e.g. verification_acc) instead")
    with pytest.raises(ConfigError, match="train.target_metric='tar_at_far_1e-4'"):
        FaceTask(load_config(TINY, ["train.target_metric=tar_at_far_1e-4"])).primary_metric()
    big = FaceTask(load_config(TINY, ["face.eval_pairs=2000"]))  # 1000 impostors
    assert big.metric("tar_at_far_1e-3", "k").mode == "max"
    with pytest.raises(ConfigError, match="needs >= 10000 impostor pairs"):
        big.metric("tar_at_far_1e-4", "schedule.plateau.metric")
    # a .bin set: counted from the file (3 impostors of 4 pairs), or its missing file named
    (tmp_path / "lfw.bin").write_bytes(pickle.dumps(([bytes([i]) for i in range(8)], [True, False, False, False])))
    named = FaceTask(load_config(TINY, ["face.val_targets=[lfw]",
                                        f"face.val_root={tmp_path}"]))
    with pytest.raises(ConfigError, match="schedule.plateau.metric='lfw_tar_at_far_1e-3' can "
                                          "be null: .* the set has 3;"):
        named.metric("lfw_tar_at_far_1e-3", "schedule.plateau.metric")
    assert named.metric("lfw_acc", "k").mode == "max"
    (tmp_path / "lfw.bin").unlink()
    with pytest.raises(ConfigError, match="face.val_targets: 'lfw' has no file"):
        named.metric("lfw_tar_at_far_1e-3", "k")


# ---- flip_embed ----------------------------------------------------------------------------

def test_flip_embed_sums_both_views_then_normalises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 5, 6))  # not mirror-symmetric
    x = torch.randn(7, 3, 4, 5)
    mirrored = x[..., torch.arange(4, -1, -1)]  # the image read right to left
    a, b = model(x), model(mirrored)
    s = a + b
    want = s / s.pow(2).sum(1, keepdim=True).sqrt()
    got = flip_embed(model, x)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 1e-6
    # the flip matters, and summing before normalising is not the mean of unit vectors
    assert (got - a / a.norm(dim=1, keepdim=True)).abs().max() > 1e-2
    unit = a / a.norm(dim=1, keepdim=True) + b / b.norm(dim=1, keepdim=True)
    assert (got - unit / unit.norm(dim=1, keepdim=True)).abs().max() > 1e-3


# ---- FaceTask: metrics and the distributed evaluate ----------------------------------------

def test_face_metrics_resolve_per_set_names():
    cfg = load_config(TINY, ["face.val_targets=[lfw,cfp_fp]"])
    task = FaceTask(cfg)
    assert task.primary_metric().name == "verification_acc"
    assert task.metric("verification_std", "k").mode == "min"
    assert task.metric("cfp_fp_acc", "k").better(0.9, 0.8)
    assert len(task.metrics) == 12
    with pytest.raises(ConfigError, match="schedule.plateau.metric='agedb_30_acc'"):
        task.metric("agedb_30_acc", "schedule.plateau.metric")


EVAL = ["face.eval_pairs=203", "face.eval_identities=12", "face.image_size=8",
        "model.hidden=32", "face.embedding_size=16"]


class BlockPairs:
    """A second set: random pairs, sharded in contiguous uneven blocks, batches of 7."""

    def __init__(self, rank: int, world: int, n: int = 57) -> None:
        gen = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 2, 3, 8, 8, generator=gen)
        self.x[::2, 1] = self.x[::2, 0] + 0.3 * torch.randn(self.x[::2, 0].shape, generator=gen)
        same = torch.zeros(n, dtype=torch.long)
        same[::2] = 1
        cut = [0, 20, n][rank:rank + 2] if world == 2 else [0, n]
        self.y = torch.stack([torch.arange(n), same], 1)[cut[0]:cut[1]]
        self.x = self.x[cut[0]:cut[1]]

    def __len__(self) -> int:  # rank 0: 3 batches, rank 1: 6 (rank 0 then runs dummy passes)
        return -(-len(self.y) // 7)

    def __iter__(self):
        for s in range(0, len(self.y), 7):
            yield self.x[s:s + 7], self.y[s:s + 7]


def _evaluate(rank: int, world: int) -> dict:
    from largebatch.data.faces import PairLoader
    from largebatch.dist import DistEnv
    from largebatch.engines.ddp import DDPEngine
    from largebatch.engines.single import SingleEngine
    from largebatch.models import build_face_backbone
    cfg = load_config(TINY, EVAL)
    torch.manual_seed(0)
    model = build_face_backbone(cfg.model, cfg.face.embedding_size)
    cpu = torch.device("cpu")
    if world > 1:
        engine = DDPEngine(DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank),
                           cpu)
        model = engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    else:
        engine = SingleEngine(DistEnv("none"), cpu)
    model.eval()
    task = FaceTask(cfg)
    one = task.evaluate(model, PairLoader(cfg, rank, world, cpu, batch_size=32), engine)
    sets = {"synthetic": PairLoader(cfg, rank, world, cpu, batch_size=32),
            "blocks": BlockPairs(rank, world)}
    dist, same = pair_distances(model, PairLoader(cfg, rank, world, cpu, batch_size=32), engine)
    return {"one": one, "sets": task.evaluate(model, sets, engine), "dist": dist, "same": same}


def test_two_rank_evaluate_equals_single_process():
    ranks = spawn(_evaluate, 2, timeout=120)
    single = _evaluate(0, 1)
    # 203 and 57 pairs cannot resolve a FAR of 1e-3: each TAR comes with its note
    tail = ("acc", "std", "tar_at_far_1e-3", "tar_at_far_1e-3_note", "tar_at_far_1e-4",
            "tar_at_far_1e-4_note")
    primary = ["verification_acc", "verification_std", *tail[2:]]
    keys = primary + [f"{p}_{k}" for p in ("synthetic", "blocks") for k in tail]
    assert list(single["sets"]) == keys
    assert list(single["one"]) == primary
    for key, k in zip(primary, tail):  # the first set of a mapping is the primary one
        assert single["sets"][key] == single["one"][key] == single["sets"][f"synthetic_{k}"]
    for got in ranks:  # the gathered distances, in global pair order, on every rank
        assert torch.equal(got["same"], single["same"])
        assert (got["dist"] - single["dist"]).abs().max() <= 1e-6
        assert single["dist"].dtype == torch.float64 and len(single["dist"]) == 203
    assert ranks[0]["one"] == ranks[1]["one"] and ranks[0]["sets"] == ranks[1]["sets"]
    for got in ranks:
        for part in ("one", "sets"):
            assert set(got[part]) == set(single[part])
            for k, v in single[part].items():  # 203 pairs: TAR@FAR is None with its note
                if isinstance(v, float):
                    assert abs(got[part][k] - v) <= 1e-6, k
                else:
                    assert got[part][k] == v, k
    assert single["sets"]["blocks_tar_at_far_1e-3"] is None
    assert "the set has 28" in single["sets"]["blocks_tar_at_far_1e-3_note"]
    # an untrained net already separates the synthetic identities somewhat, not perfectly
    assert 0.55 < single["one"]["verification_acc"] < 1.0
    assert single["sets"]["blocks_acc"] != single["sets"]["synthetic_acc"]
