"""The face batch-size study: quick mode end to end, plus its verdicts on synthetic rows.

One quick study (every arm of configs/face/study.yaml under ``study.quick=true``: 2,000
synthetic identities, batch 128 and 512, two epochs) runs once per module as a real
``python -m largebatch study`` process; its table is checked against the runs' own records
and every verdict is re-derived here from the table, independently of the study's code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from largebatch.config import ConfigError, load_config
from largebatch.study import face_verdicts as fv
from largebatch.study.configs import capped_split, prepare_runs
from largebatch.study.face_measure import batch_path
from largebatch.study.runner import quick_config
from largebatch.study.sweep import make_sweep
from tests.conftest import CONFIGS
from tests.unit.study._quick import num, quick_study, records

STUDY = CONFIGS / "face" / "study.yaml"
FIXED = ["naive", "linear", "goyal", "lars", "lamb"]
EXPECTED = ([(arm, b) for arm in FIXED for b in (128, 512)] + [("goodput", 128)]
            + [(f"pfc_{r}", 512) for r in ("1.0", "0.3", "0.1")])
FACE_COLS = ["final_verification_acc", "best_verification_acc", "final_tar_at_far_1e-3",
             "loss_osc_1000", "epoch_time_s", "data_time_s", "compute_time_s",
             "steps_to_target", "time_to_target_s", "noise_scale_early", "noise_scale_late",
             "sample_rate", "head_rows", "logits_mb", "fc_memory_mb", "final_global_size"]
ALWAYS_FINITE = ["final_verification_acc", "best_verification_acc", "loss_osc_1000",
                 "epoch_time_s", "data_time_s", "compute_time_s", "noise_scale_late",
                 "head_rows", "logits_mb", "epochs_run", "lr"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick face study; returns (out_dir, stdout, rows from study.csv, study.json)."""
    return quick_study(tmp_path_factory.mktemp("face_study"), STUDY, timeout=240)


def test_columns_arms_and_the_same_epochs(quick):
    out, stdout, rows, js = quick
    for name in ("study.csv", "study.json", "study.md", "accuracy_vs_batch.png",
                 "loss_first.png", "accuracy.png", "noise_scale.png", "eval_curves.json"):
        assert (out / name).is_file(), name
    assert set(FACE_COLS) <= set(rows[0])
    assert [(r["arm"], int(r["batch_size"])) for r in rows] == EXPECTED
    for r in rows:
        assert r["status"] == "ran" and float(r["epochs_run"]) == pytest.approx(2.0)
        for key in ALWAYS_FINITE:
            assert math.isfinite(num(r, key)), (r["arm"], r["batch_size"], key)
        assert num(r, "epoch_time_s") == pytest.approx(num(r, "memory_epoch_time_s"))
    by = {(r["arm"], int(r["batch_size"])): r for r in rows}
    # The rules: naive keeps the LR, linear, goyal and lars scale theirs x4 at 512, lamb x2 (from
    # its own base LR 0.01); PFC samples.
    assert num(by["naive", 512], "lr") == pytest.approx(0.003)
    assert num(by["linear", 512], "lr") == pytest.approx(0.012)
    assert num(by["goyal", 512], "lr") == pytest.approx(0.012)
    assert num(by["lars", 512], "lr") == pytest.approx(0.8)
    assert num(by["lamb", 512], "lr") == pytest.approx(0.02)
    assert [int(by[f"pfc_{r}", 512]["head_rows"]) for r in ("1.0", "0.3", "0.1")] == \
        [2000, 600, 200]
    assert "Face recognition batch-size study" in (out / "study.md").read_text()
    assert sum(line.startswith("[") for line in stdout.splitlines()) == len(EXPECTED)


def test_rows_match_the_runs_records(quick):
    out, _, rows, js = quick
    target = js["meta"]["sweep"]["target_acc"]
    curves = json.loads((out / "eval_curves.json").read_text())
    for r in rows:
        arm, b = r["arm"], int(r["batch_size"])
        evals = [x for x in records(out / arm / f"bs{b}") if x["kind"] == "eval"]
        assert num(r, "final_verification_acc") == pytest.approx(evals[-1]["verification_acc"])
        assert num(r, "best_verification_acc") == pytest.approx(
            max(e["verification_acc"] for e in evals))
        hit = next((e for e in evals if e["verification_acc"] >= target), None)
        assert (r["reached_target"] == "True") == (hit is not None)
        if hit:  # recorded, not stopped at: every run trains its whole budget
            assert int(r["steps_to_target"]) == hit["step"]
        assert [p["val_acc"] for p in curves[arm][str(b)]] == pytest.approx(
            [e["verification_acc"] for e in evals])


def _table(rows: list[dict]) -> list[dict]:
    """The CSV rows as the verdicts read them (numbers, not strings)."""
    out = []
    for r in rows:
        out.append({"arm": r["arm"], "batch_size": int(r["batch_size"]), "status": r["status"],
                    **{k: num(r, k) for k in ("final_verification_acc", "sample_rate",
                                             "epoch_time_s", "logits_mb", "fc_memory_mb",
                                             "noise_scale_late")}})
    return out


def test_verdicts_present_and_consistent_with_the_table(quick):
    out, _, rows, js = quick
    verdicts = {v["key"]: v for v in js["verdicts"]}
    assert list(verdicts) == ["reference", "naive_harm", "recovery", "largest_kept", "goal",
                              "pfc", "noise"]
    md = (out / "study.md").read_text()
    for v in verdicts.values():
        assert v["answer"] and v["answer"] in md
    table = _table(rows)
    # The reference, recomputed: the best fixed-batch accuracy at a batch <= 512.
    small = [(r["final_verification_acc"], r["arm"], r["batch_size"]) for r in table
             if r["arm"] in FIXED and r["batch_size"] <= 512]
    ref = max(small)
    assert verdicts["reference"]["numbers"]["acc"] == pytest.approx(ref[0])
    # The largest batch whose best recipe (linear, goyal, lars, lamb) is within 0.5 point.
    best: dict[int, float] = {}
    for r in table:
        if r["arm"] in ("linear", "goyal", "lars", "lamb"):
            best[r["batch_size"]] = max(best.get(r["batch_size"], -1), r["final_verification_acc"])
    kept = [b for b, a in best.items() if a >= ref[0] - 0.005]
    assert verdicts["largest_kept"]["numbers"]["largest_batch"] == (max(kept) if kept else None)
    # Quick mode stops at 512: the goal at >= 8192 is not tested there.
    assert verdicts["goal"]["answer"].startswith("not tested")
    # Naive harm: the first naive batch below the tolerance.
    naive = sorted((r["batch_size"], r["final_verification_acc"]) for r in table
                   if r["arm"] == "naive")
    onset = next((b for b, a in naive if a < naive[0][1] - 0.005), None)
    got = verdicts["naive_harm"]["numbers"].get("onset_batch")
    assert got == onset
    # Partial FC: the accuracy change and the logits' ratio against sample rate 1.0.
    pfc = {r["sample_rate"]: r for r in table if r["arm"].startswith("pfc_")}
    for rate in (0.3, 0.1):
        n = verdicts["pfc"]["numbers"][str(rate)]
        assert n["acc_points"] == pytest.approx(100 * (pfc[rate]["final_verification_acc"]
                                                       - pfc[1.0]["final_verification_acc"]))
        assert n["logits_ratio"] == pytest.approx(pfc[rate]["logits_mb"] / pfc[1.0]["logits_mb"])
        assert n["logits_ratio"] == pytest.approx(rate, rel=0.01)
    # The noise scale: the median late B_simple of the goyal arm.
    late = sorted(r["noise_scale_late"] for r in table if r["arm"] == "goyal")
    assert verdicts["noise"]["numbers"]["b_simple"] == pytest.approx(late[len(late) // 2])


# ---- verdicts on synthetic rows (the closed forms) -------------------------------------------


def _row(arm: str, b: int, acc: float, **kw) -> dict:
    return {"arm": arm, "batch_size": b, "status": "ran", "final_verification_acc": acc, **kw}


SIZES = [128, 512, 2048, 8192, 16384]


def test_naive_harm_recovery_and_goal_in_closed_form():
    rows = ([_row("naive", b, a) for b, a in zip(SIZES, [0.905, 0.901, 0.88, 0.80, 0.70])]
            + [_row("goyal", b, a) for b, a in zip(SIZES, [0.905, 0.902, 0.902, 0.901, 0.85])]
            + [_row("lamb", b, a) for b, a in zip(SIZES, [0.90, 0.90, 0.89, 0.88, 0.88])])
    v = {x.key: x for x in fv.face_verdicts(rows)}
    assert v["reference"].numbers["acc"] == 0.905 and v["reference"].numbers["batch"] == 128
    # 0.901 at 512 is within 0.5 point of naive's own 0.905 at 128; 0.88 at 2048 is not:
    # 5 doublings from 512 to 16384.
    n = v["naive_harm"].numbers
    assert (n["onset_batch"], n["last_kept_batch"]) == (2048, 512)
    assert n["points_per_doubling"] == pytest.approx(100 * (0.901 - 0.70) / 5)
    # goyal recovers (0.902-0.88)/(0.905-0.88) = 88% at 2048, ...; mean over the lost batches.
    shares = [(0.902 - 0.88) / 0.025, (0.901 - 0.80) / 0.105, (0.85 - 0.70) / 0.205]
    assert v["recovery"].numbers["mean_recovered"]["goyal"] == pytest.approx(sum(shares) / 3)
    assert v["largest_kept"].numbers == {"largest_batch": 8192, "arm": "goyal", "acc": 0.901}
    assert v["goal"].numbers["met"] is True and v["goal"].numbers["batch"] == 8192
    rows[8]["final_verification_acc"] = 0.85  # goyal at 8192 now 5.5 points below
    goal = {x.key: x for x in fv.face_verdicts(rows)}["goal"]
    assert goal.numbers["met"] is False and goal.answer.startswith("NOT met")
    assert goal.numbers["gap_points"] == pytest.approx(100 * (0.905 - 0.88))  # lamb at 8192


def test_pfc_and_noise_in_closed_form():
    rows = [_row("goyal", 128, 0.9, noise_scale_late=300.0),
            _row("goyal", 512, 0.9, noise_scale_late=500.0),
            _row("goyal", 2048, 0.8, noise_scale_late=700.0)]
    rows += [_row(f"pfc_{r}", 2048, a, sample_rate=r, epoch_time_s=t, logits_mb=m,
                  fc_memory_mb=1.0) for r, a, t, m in ((1.0, 0.8, 10.0, 100.0),
                                                         (0.1, 0.79, 4.0, 10.0))]
    v = {x.key: x for x in fv.face_verdicts(rows)}
    assert v["pfc"].numbers["0.1"]["acc_points"] == pytest.approx(-1.0)
    assert v["pfc"].numbers["0.1"]["epoch_time_ratio"] == pytest.approx(0.4)
    # B_simple 500 (median); the best recipe first loses at 2048: x4.1 > x4, disagree.
    assert v["noise"].numbers == {"arm": "goyal", "b_simple": 500.0, "measured_stop": 2048,
                                  "agree": False}


def test_config_errors_and_the_capped_micro():
    cfg = load_config(STUDY)
    with pytest.raises(ConfigError, match="sizes='middle' is not one of all"):
        make_sweep(load_config(STUDY, ["study.arms=[{name: a, sizes: middle}]"]), 1)
    with pytest.raises(ConfigError, match="study.max_micro=0"):
        make_sweep(load_config(STUDY, ["study.max_micro=0"]), 1)
    assert capped_split(16384, 1, 1024) == (1024, 16)
    assert capped_split(512, 1, 1024) == (512, 1)
    assert capped_split(6000, 1, 1024) == (1000, 6)
    specs, _ = prepare_runs(cfg, make_sweep(cfg, 1), STUDY.parent, [], Path("/tmp/x"), 1)
    got = [(s.arm, s.batch_size) for s in specs]
    assert ("goodput", 128) in got and ("goodput", 512) not in got
    assert [b for a, b in got if a == "pfc_0.1"] == [16384]
    big = next(s for s in specs if s.arm == "goyal" and s.batch_size == 16384)
    assert (big.plan.micro_size, big.plan.accum_steps) == (1024, 16)
    assert not big.train_cfg.train.stop_at_target and big.train_cfg.train.epochs == 3


def test_quick_overrides_under_the_command_line():
    cli = ["study.quick=true", "face.eval_pairs=600"]
    cfg = quick_config(load_config(STUDY, cli), cli)
    assert cfg.face.num_classes == 2000 and cfg.study.batch_sizes == [128, 512]
    assert cfg.face.eval_pairs == 600  # the command line wins over study.quick_overrides
    full = load_config(STUDY)
    assert quick_config(full, []) is full and full.face.num_classes == 20000


def test_batch_path_follows_the_plan_changes():
    cfg = load_config(STUDY)
    specs, _ = prepare_runs(cfg, make_sweep(cfg, 1), STUDY.parent, [], Path("/tmp/x"), 1)
    plan = next(s.plan for s in specs if s.arm == "goodput")
    recs = ([{"kind": "train", "step": k} for k in range(1, 5)]
            + [{"kind": "plan_change", "step": 2, "global_size": 512}])
    # steps 1-2 at 128 (the change after step 2 applies from step 3), steps 3-4 at 512
    assert batch_path(recs, plan) == {"final_global_size": 512, "mean_global_size": 320.0}
    assert batch_path(recs[:4], plan)["final_global_size"] == 128
