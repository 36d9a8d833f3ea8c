"""The empirical-model advice (``largebatch.noise.advice``) against hand-computed values, and
``largebatch noise-scale`` end to end on the real MNIST."""
from __future__ import annotations

import json
import math

import pytest

from largebatch.config import ConfigError, load_config
from largebatch.noise.advice import (NoiseEstimate, advise, candidate_batches, critical_batch,
                                     recommended_batch, samples_ratio, steps_ratio, summarize)
from largebatch.plan import make_plan, noise_split
from tests.conftest import CONFIGS, cli, run_many

SEED = CONFIGS / "mnist" / "seed.yaml"


def plan_of(*overrides: str, world: int = 1, dataset: int = 60000):
    """A plan built the public way (no data read: the dataset size is given)."""
    return make_plan(load_config(SEED, list(overrides)), world, dataset)


def test_steps_and_samples_ratios_at_hand_computed_points():
    # S/S_min = 1 + Bn/B, E/E_min = 1 + B/Bn: at B=100, Bn=400 -> 5 and 1.25.
    assert steps_ratio(100, 400) == pytest.approx(5.0)
    assert samples_ratio(100, 400) == pytest.approx(1.25)
    assert steps_ratio(1600, 400) == pytest.approx(1.25)
    assert samples_ratio(1600, 400) == pytest.approx(5.0)
    # At the critical batch both cost exactly twice their minimum...
    assert critical_batch(400) == 400
    assert steps_ratio(400, 400) == pytest.approx(2.0)
    assert samples_ratio(400, 400) == pytest.approx(2.0)
    # ...and the product 2 + B/Bn + Bn/B is smallest there: 4 vs 4.5 at half and double.
    product = lambda b: steps_ratio(b, 400) * samples_ratio(b, 400)  # noqa: E731
    assert product(400) == pytest.approx(4.0)
    assert product(200) == pytest.approx(4.5) and product(800) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        steps_ratio(100, 0.0)
    with pytest.raises(ValueError):
        samples_ratio(100, math.nan)


def test_recommended_batch_rounds_in_log_space_to_a_multiple_of_micro_times_world():
    plan = plan_of("batch.global_size=60", "batch.micro_size=60")  # unit 60
    assert recommended_batch(170, plan) == 180   # 170 is nearer 180 than 120
    # Between 60 and 120 the boundary is their geometric mean 84.85, not 90:
    assert recommended_batch(84, plan) == 60
    assert recommended_batch(88, plan) == 120    # a linear rounding would give 60
    assert recommended_batch(10, plan) == 60     # never below one unit
    assert recommended_batch(1e9, plan) == 60000  # at most the dataset, as a multiple
    capped = plan_of("batch.global_size=60", "batch.micro_size=60", "batch.max_global_size=250")
    assert recommended_batch(1000, capped) == 240  # max_global_size floored to a multiple
    two_ranks = plan_of("batch.global_size=60", "batch.micro_size=30", world=2)
    assert recommended_batch(100, two_ranks) == 120  # unit 30 x 2 = 60: log(120/100) < log(100/60)


@pytest.mark.parametrize("rule,lr_at_240", [("linear", 0.08), ("sqrt", 0.04), ("none", 0.02)])
def test_lr_at_another_batch_follows_the_scaling_rule(rule, lr_at_240):
    # base LR 0.02 at the configured batch 60: linear x4, sqrt x2, none x1 at batch 240.
    plan = plan_of("batch.global_size=60", "batch.micro_size=60", f"optim.scale_rule={rule}")
    at = plan.with_global_size(240)
    assert (at.global_size, at.micro_size, at.accum_steps) == (240, 60, 4)
    assert at.peak_lr == pytest.approx(lr_at_240)
    # With an explicit base batch the rule scales from it: linear 0.02 * 240/120 = 0.04.
    based = plan_of("batch.global_size=60", "batch.micro_size=60", f"optim.scale_rule={rule}",
                    "optim.base_batch=120")
    assert based.with_global_size(240).peak_lr == pytest.approx(
        {"linear": 0.04, "sqrt": 0.02 * 2 ** 0.5, "none": 0.02}[rule])
    with pytest.raises(ConfigError, match="not divisible"):
        plan.with_global_size(250)


def test_summarize_takes_the_median_and_iqr_of_the_second_half():
    # 10 values: second half [5, nan, 6, -1, 8] -> usable 5, 6, 8: median 6, quartiles 5.5, 7.
    values = [None, 100.0, 100.0, 100.0, 100.0, 5.0, math.nan, 6.0, -1.0, 8.0]
    est = summarize(values)
    assert (est.value, est.low, est.high, est.count) == (6.0, 5.5, 7.0, 3)
    assert summarize([None, None, -2.0, math.inf]) is None
    # metrics.jsonl writes non-finite numbers as strings: they are dropped like the floats.
    as_written = [None, 100.0, 100.0, 100.0, 100.0, 5.0, "nan", 6.0, "-inf", 8.0]
    assert summarize(as_written) == est
    assert summarize([None, None, "inf", "nan"]) is None


def test_advice_table_and_recommended_lr_match_a_plan_built_at_that_batch():
    plan = plan_of("batch.global_size=60", "batch.micro_size=60", "optim.scale_rule=linear")
    adv = advise(NoiseEstimate(value=500.0, low=400.0, high=625.0, count=20), plan)
    rec = adv["recommended"]
    assert rec["global_size"] == 480  # 480 vs 540: log(500/480) = 0.041 < log(540/500) = 0.077
    # The LR the user would get by configuring that batch, with base LR 0.02 at 60:
    direct = plan_of("batch.global_size=480", "batch.micro_size=60", "optim.scale_rule=linear",
                     "optim.base_batch=60")
    assert rec["lr"] == pytest.approx(direct.peak_lr) == pytest.approx(0.16)
    assert rec["accum_steps"] == direct.accum_steps == 8
    conf = adv["configured"]
    assert conf["global_size"] == 60 and conf["lr"] == pytest.approx(0.02)
    assert conf["steps_ratio"] == pytest.approx(1 + 500 / 60)
    assert conf["samples_ratio"] == pytest.approx(1 + 60 / 500)
    assert conf["steps_ratio_range"] == pytest.approx([1 + 400 / 60, 1 + 625 / 60])
    assert conf["samples_ratio_range"] == pytest.approx([1 + 60 / 625, 1 + 60 / 400])
    # unit 60 x 2^k in [125, 2000]: 240, 480, 960, 1920; plus the configured 60.
    assert [r["global_size"] for r in adv["table"]] == [60, 240, 480, 960, 1920]
    assert candidate_batches(500.0, plan, 480) == [60, 240, 480, 960, 1920]
    assert adv["critical_batch"] == 500.0


@pytest.mark.parametrize("global_size, world, split", [
    (240, 1, (120, 2)), (60, 1, (30, 2)), (15, 1, (5, 3)), (7, 1, (1, 7)), (1, 1, None),
    (240, 2, None),  # under DDP the ranks' windows are the small batches: nothing to split
])
def test_measurement_splits_a_one_micro_batch_window_as_the_plan_does(tmp_path, global_size,
                                                                     world, split):
    """The CLI's measuring run uses the plan's one rule (``plan.noise_split``), the study's."""
    from largebatch.cli.noise_scale import measurement_overrides
    micro = global_size // world
    cfg = load_config(SEED, [f"batch.global_size={global_size}", f"batch.micro_size={micro}",
                             "data.download=false"])
    if world == 1 and split is None:
        with pytest.raises(ConfigError, match="batch.global_size=1 on one process"):
            measurement_overrides(cfg, 10, world, str(tmp_path))
        return
    extra, note = measurement_overrides(cfg, 10, world, str(tmp_path))
    if split is None:
        assert note is None and not any(e.startswith("batch.") for e in extra)
        return
    assert split == noise_split(global_size, world)
    assert extra[-3:] == [f"batch.global_size={global_size}", f"batch.micro_size={split[0]}",
                          f"batch.accum_steps={split[1]}"]
    assert f"micro {split[0]} x accum {split[1]} (global {global_size} unchanged)" in note


@pytest.fixture(scope="module")
def bad_cli() -> dict:
    """The two refused ``largebatch noise-scale`` commands (no data read), once per module and
    side by side (each is mostly the interpreter's start-up): name -> its ``Ran``."""
    cmds = {"bad_steps": cli("noise-scale", str(SEED), "--steps", "1"),
            "bad_batch": cli("noise-scale", str(SEED), "batch.global_size=250",
                             "batch.micro_size=60")}
    return dict(zip(cmds, run_many(list(cmds.values()), timeout=120)))


@pytest.fixture(scope="module")
def measured_cli(mnist_root) -> dict:
    """The two measuring ``largebatch noise-scale`` runs on the real MNIST, once per module
    and side by side (independent, one core each): name -> its ``Ran``."""
    data = [f"data.root={mnist_root}", "data.download=false"]
    cmds = {"measures": cli("noise-scale", str(SEED), "--steps", "30", "--json",
                            "batch.global_size=240", "batch.micro_size=60", "data.subset=6000",
                            "data.test_subset=1000", *data, "optim.scale_rule=linear"),
            "splits": cli("noise-scale", str(SEED), "--steps", "10", "--json",
                          "batch.global_size=240", "batch.micro_size=240", "data.subset=3000",
                          "data.test_subset=500", *data)}
    return dict(zip(cmds, run_many(list(cmds.values()), timeout=300)))


def test_cli_bad_steps_is_one_line_and_exit_2(bad_cli):
    proc = bad_cli["bad_steps"]
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--steps=1" in lines[0] and ">= 2" in lines[0], proc


def test_cli_bad_batch_is_one_line_and_exit_2(bad_cli):
    proc = bad_cli["bad_batch"]
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch.global_size=250" in lines[0], proc


def test_cli_measures_a_finite_noise_scale_on_real_mnist(measured_cli):
    proc = measured_cli["measures"]
    assert proc.returncode == 0, proc
    out = json.loads(proc.stdout)  # stdout is the one object, nothing else
    est = out["noise_scale"]
    assert math.isfinite(est["value"]) and est["value"] > 0
    assert est["low"] <= est["value"] <= est["high"] and est["count"] >= 1
    assert out["measured_with"] == {"global_size": 240, "micro_size": 60, "accum_steps": 4,
                                    "world_size": 1}
    assert out["split_window"] is False and out["steps"] == 30
    rec = out["recommended"]
    assert rec["global_size"] % 60 == 0
    assert rec["lr"] == pytest.approx(0.02 * rec["global_size"] / 240)  # linear from 240


def test_cli_splits_a_one_micro_batch_window_and_says_so(measured_cli):
    proc = measured_cli["splits"]
    assert proc.returncode == 0, proc
    out = json.loads(proc.stdout)
    assert out["split_window"] is True
    # The plan's split (the study's): 240's smallest prime factor 2 -> micro 120 x accum 2.
    assert out["measured_with"] == {"global_size": 240, "micro_size": 120, "accum_steps": 2,
                                    "world_size": 1}
    assert "micro 120 x accum 2 (global 240 unchanged)" in proc.stderr
    # The advice keeps the configured micro size: every batch is a multiple of 240.
    assert all(r["global_size"] % 240 == 0 for r in out["table"])
